"""Mapillary Street-level Sequences (MSLS) in its native layout, read as the official code does.

    <root>/train_val/<city>/{query,database}/images/<key>.jpg
    <root>/train_val/<city>/{query,database}/seq_info.csv       ,key,sequence_key,frame_number
    <root>/train_val/<city>/{query,database}/postprocessed.csv  ,key,easting,northing,unique_cluster,
                                                                 control_panel,night,view_direction
    <root>/train_val/<city>/{query,database}/raw.csv            ,key,lon,lat,ca,captured_at,pano
    <root>/train_val/<city>/{query,database}/subtask_index.csv  ,all,s2w,w2s,o2n,n2o,d2n,n2d

The four files of a folder describe the same images row by row (the first, unnamed column
is the row index); booleans are written ``True`` / ``False``. The official validation
protocol (mapillary_sls ``evaluate.py``, image to image): cities cph and sf; queries and
database images flagged in ``subtask_index.csv`` (column ``all``) and not panoramas; a
database image within 25 m of a query, in the same city, is a positive; queries without
any positive are left out. On the real data: 740 queries (cph 498, sf 242) and 18,871
database images. The UTM folder conversion of MSLS keeps every non-panorama query (11,120):
another protocol, which wakd calls ``msls-val-folder`` (``dataset=msls_folder``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wakd.data.ground_truth import radius_positives
from wakd.data.netvlad_mat import DatasetFormatError

VAL_CITIES = ("cph", "sf")
TRAIN_CITIES = (
    "trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto",
    "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa",
    "phoenix", "goa", "amman", "nairobi", "manila",
)
SUBTASKS = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
ROLES = ("query", "database")
# Columns wakd needs from each file (the real files have more; order does not matter).
NEEDED_COLUMNS = {
    "seq_info.csv": ("key",),
    "postprocessed.csv": ("key", "easting", "northing"),
    "raw.csv": ("key", "pano"),
}
EXPECTED_TREE = (
    "<root>/train_val/<city>/{query,database}/images/<key>.jpg\n"
    "<root>/train_val/<city>/{query,database}/{seq_info,postprocessed,raw,subtask_index}.csv"
)
_BOOLEANS = {"True": True, "False": False}


@dataclass(frozen=True)
class MslsImages:
    """The images of one city's query or database folder that a protocol keeps."""

    rel: list[str]  # image paths relative to the MSLS root
    utm: np.ndarray  # [n, 2] float64 (easting, northing)


class _Table:
    """One CSV file: its header and rows, every problem reported with the file and line."""

    def __init__(self, path: Path, needed: tuple[str, ...]) -> None:
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; an MSLS city folder holds:\n{EXPECTED_TREE}")
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
        if not lines:
            raise DatasetFormatError(f"{path}: empty file, expected a header line")
        self.header = lines[0]
        missing = [c for c in needed if c not in self.header]
        if missing:
            raise DatasetFormatError(
                f"{path} line 1: no column {', '.join(repr(c) for c in missing)} "
                f"in the header {','.join(self.header)!r}"
            )
        self.rows = lines[1:]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise DatasetFormatError(
                    f"{path} line {i + 2}: {len(row)} fields, the header has {len(self.header)}"
                )

    def column(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [row[j] for row in self.rows]

    def floats(self, name: str) -> np.ndarray:
        values = self.column(name)
        try:
            return np.array(values, dtype=np.float64)
        except ValueError:
            i = next(i for i, v in enumerate(values) if not _is_float(v))
            raise DatasetFormatError(
                f"{self.path} line {i + 2}: {name} = {values[i]!r} is not a number"
            ) from None

    def booleans(self, name: str) -> np.ndarray:
        values = self.column(name)
        for i, v in enumerate(values):
            if v not in _BOOLEANS:
                raise DatasetFormatError(
                    f"{self.path} line {i + 2}: {name} = {v!r}, expected True or False"
                )
        return np.array([_BOOLEANS[v] for v in values], dtype=bool)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def city_folder(root: Path, city: str) -> Path:
    """``<root>/train_val/<city>``, or a clear error listing the cities that are there."""
    folder = root / "train_val" / city
    if not folder.is_dir():
        present = sorted(p.name for p in (root / "train_val").glob("*") if p.is_dir())
        raise FileNotFoundError(
            f"MSLS city '{city}' not found: {folder} does not exist "
            f"(cities under {root / 'train_val'}: {', '.join(present) or 'none'}). Expected:\n"
            f"{EXPECTED_TREE}"
        )
    return folder


def read_role(
    root: Path, city: str, role: str, subtask: str | None = "all", exclude_panos: bool = True
) -> MslsImages:
    """One city's ``query`` or ``database`` images in CSV order, filtered as the protocol says
    (``subtask=None``: no subtask filter, as MSLS trains)."""
    if subtask is not None and subtask not in SUBTASKS:
        raise ValueError(f"MSLS subtask {subtask!r}: choose one of {', '.join(SUBTASKS)}")
    folder = city_folder(root, city) / role
    tables = {name: _Table(folder / name, needed) for name, needed in NEEDED_COLUMNS.items()}
    if subtask is not None:
        tables["subtask_index.csv"] = _Table(folder / "subtask_index.csv", (subtask,))
    keys = tables["seq_info.csv"].column("key")
    for i, key in enumerate(keys):
        if not key or "/" in key or "\\" in key or key.startswith("."):
            raise DatasetFormatError(
                f"{folder / 'seq_info.csv'} line {i + 2}: key {key!r} is not an image name "
                "(images/<key>.jpg must stay inside the images folder)"
            )
    for table in tables.values():
        if len(table.rows) != len(keys):
            raise DatasetFormatError(
                f"{table.path}: {len(table.rows)} rows, but {folder / 'seq_info.csv'} has "
                f"{len(keys)}; the four CSV files of a folder describe the same images row by row"
            )
        if "key" in table.header:
            for i, (key, other) in enumerate(zip(keys, table.column("key"), strict=True)):
                if key != other:
                    raise DatasetFormatError(
                        f"{table.path} line {i + 2}: key {other!r}, but seq_info.csv has {key!r} "
                        "on that line; the CSV files must list the same images in the same order"
                    )
    keep = np.ones(len(keys), dtype=bool)
    if subtask is not None:
        keep &= tables["subtask_index.csv"].booleans(subtask)
    if exclude_panos:
        keep &= ~tables["raw.csv"].booleans("pano")
    post = tables["postprocessed.csv"]
    utm = np.stack([post.floats("easting"), post.floats("northing")], axis=1)  # [n, 2]
    base = Path("train_val") / city / role / "images"
    rel = [(base / f"{key}.jpg").as_posix() for key, k in zip(keys, keep, strict=True) if k]
    return MslsImages(rel=rel, utm=utm[keep])


@dataclass(frozen=True)
class MslsProtocol:
    """The images and regions of one MSLS evaluation, ready for ``PlaceSplit``."""

    db_rel: list[str]
    q_rel: list[str]
    db_utm: np.ndarray  # [N, 2]
    q_utm: np.ndarray  # [M, 2]
    db_regions: np.ndarray  # [N] int64 city number
    q_regions: np.ndarray  # [M] int64
    dropped: list[str]  # queries kept by the filters but without a positive (left out or not)


def read_protocol(
    root: str | os.PathLike,
    cities: tuple[str, ...] = VAL_CITIES,
    subtask: str | None = "all",
    radius: float = 25.0,
    exclude_panos: bool = True,
    drop_queries_without_positive: bool = True,
) -> MslsProtocol:
    """Every kept database image and the kept queries (those with a positive within ``radius``
    in their own city, where ``drop_queries_without_positive``)."""
    root = Path(root)
    db_rel: list[str] = []
    q_rel: list[str] = []
    db_utm, q_utm, db_regions, q_regions = [], [], [], []
    dropped: list[str] = []
    for number, city in enumerate(cities):
        db = read_role(root, city, "database", subtask, exclude_panos)
        q = read_role(root, city, "query", subtask, exclude_panos)
        has_positive = np.array([len(p) > 0 for p in radius_positives(db.utm, q.utm, radius)], dtype=bool)
        dropped += [r for r, h in zip(q.rel, has_positive, strict=True) if not h]
        if not drop_queries_without_positive:
            has_positive[:] = True
        db_rel += db.rel
        q_rel += [r for r, h in zip(q.rel, has_positive, strict=True) if h]
        db_utm.append(db.utm)
        q_utm.append(q.utm[has_positive])
        db_regions.append(np.full(len(db.rel), number, dtype=np.int64))
        q_regions.append(np.full(int(has_positive.sum()), number, dtype=np.int64))
    return MslsProtocol(
        db_rel=db_rel,
        q_rel=q_rel,
        db_utm=np.concatenate(db_utm).reshape(-1, 2),
        q_utm=np.concatenate(q_utm).reshape(-1, 2),
        db_regions=np.concatenate(db_regions),
        q_regions=np.concatenate(q_regions),
        dropped=dropped,
    )
