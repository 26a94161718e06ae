"""A miniature MSLS in the native layout (``wakd.data.msls``), for tests and trying the protocol.

    python -m wakd.data.msls_miniature --out DIR [--database 24] [--queries 12]

Each city holds a street of database images 10 m apart; every 5th image is a panorama and
every 7th is left out of ``subtask_index.csv``'s ``all``; queries stand 3 m from a database
image, except every 4th, which stands 1 km off the street (no positive). Images are tiny
JPEGs whose colour follows the position along the street.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from wakd.atomic import atomic_write_bytes, atomic_write_text

# (easting, northing, longitude, latitude) of a street in each validation city (UTM 33U, 10S).
ORIGINS = {"cph": (347_000.0, 6_176_000.0, 12.57, 55.68), "sf": (551_000.0, 4_180_000.0, -122.42, 37.77)}
SEQ_HEADER = ["", "key", "sequence_key", "frame_number"]
POST_HEADER = ["", "key", "easting", "northing", "unique_cluster", "control_panel", "night", "view_direction"]
RAW_HEADER = ["", "key", "lon", "lat", "ca", "captured_at", "pano"]
SUBTASK_HEADER = ["", "all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d"]


@dataclass(frozen=True)
class Frame:
    key: str
    easting: float
    northing: float
    pano: bool
    in_all: bool


def _street(city: str, role: str, count: int) -> list[Frame]:
    east0, north0, _, _ = ORIGINS[city]
    frames = []
    for i in range(count):
        if role == "database":
            east, north = east0 + 10.0 * i, north0
        elif i % 4 == 3:  # far from the street: no positive
            east, north = east0 + 10.0 * i, north0 + 1000.0
        else:
            east, north = east0 + 10.0 * i + 3.0, north0 + 1.0
        frames.append(Frame(f"{city}{role[0]}{i:05d}", east, north, pano=i % 5 == 4, in_all=i % 7 != 6))
    return frames


def _jpeg(frame: Frame, east0: float) -> bytes:
    shade = int((frame.easting - east0) * 2) % 256
    image = Image.new("RGB", (16, 12), (shade, 255 - shade, 80 if frame.pano else 160))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _csv(header: list[str], rows: list[list[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[i, *row] for i, row in enumerate(rows)])
    return out.getvalue()


def _write_role(folder: Path, city: str, frames: list[Frame]) -> None:
    east0, north0, lon0, lat0 = ORIGINS[city]
    for f in frames:
        atomic_write_bytes(folder / "images" / f"{f.key}.jpg", _jpeg(f, east0))
    atomic_write_text(
        folder / "seq_info.csv", _csv(SEQ_HEADER, [[f.key, f"{city}seq", i] for i, f in enumerate(frames)])
    )
    atomic_write_text(
        folder / "postprocessed.csv",
        _csv(POST_HEADER, [[f.key, f.easting, f.northing, i // 3, False, False, "Forward"] for i, f in enumerate(frames)]),
    )
    atomic_write_text(
        folder / "raw.csv",
        _csv(RAW_HEADER, [
            [f.key, lon0 + (f.easting - east0) * 1e-5, lat0 + (f.northing - north0) * 1e-5, 90.0,
             1_500_000_000_000 + i, f.pano]
            for i, f in enumerate(frames)
        ]),
    )
    atomic_write_text(
        folder / "subtask_index.csv", _csv(SUBTASK_HEADER, [[f.in_all] + [False] * 6 for f in frames])
    )


def write_miniature(out: str | Path, num_database: int = 24, num_queries: int = 12) -> dict[str, dict[str, int]]:
    """Write ``out/train_val/{cph,sf}/...``; returns what the official protocol must keep per city:
    ``{city: {"database": N, "queries": M, "queries_without_positive": K}}``."""
    if not 0 < num_queries <= num_database:
        raise ValueError(f"need 0 < queries ({num_queries}) <= database images ({num_database}): "
                         "queries beyond the street's end would have no positive")
    out = Path(out)
    expected = {}
    for city in ORIGINS:
        db = _street(city, "database", num_database)
        q = _street(city, "query", num_queries)
        for role, frames in (("database", db), ("query", q)):
            _write_role(out / "train_val" / city / role, city, frames)
        kept_q = [i for i, f in enumerate(q) if f.in_all and not f.pano]
        expected[city] = {
            "database": sum(f.in_all and not f.pano for f in db),
            "queries": sum(i % 4 != 3 for i in kept_q),
            "queries_without_positive": sum(i % 4 == 3 for i in kept_q),
        }
    return expected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write train_val/ into")
    parser.add_argument("--database", type=int, default=24, help="database images per city")
    parser.add_argument("--queries", type=int, default=12, help="queries per city")
    args = parser.parse_args(argv)
    print(json.dumps(write_miniature(args.out, args.database, args.queries), indent=1))


if __name__ == "__main__":
    main()
