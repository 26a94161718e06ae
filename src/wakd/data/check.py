"""Check a dataset folder before training or evaluating on it.

    python -m wakd.data.check ROOT [--kind auto] [--decode 100|all] [--list 10]

ROOT is any layout wakd reads (the NetVLAD ``.mat`` layout of Pittsburgh, Tokyo 24/7, Tokyo
TM and the synthetic city; the UTM folder layout; MSLS's native layout); every split found
is checked: image counts, files present and decodable (all, or an evenly spread sample),
UTM coordinates (and zone, where the names give one), queries without a database image
within the positive radius, duplicate names, files that are both query and database image.
Prints a summary table; exits 0 when every split is usable, 1 naming each problem, 2 when
ROOT holds no dataset wakd knows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wakd.data import msls
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import ImageLoadError, load_rgb
from wakd.data.utm_names import DATASET_ZONES, parse_utm_name

SPLITS = ("train", "val", "test")


@dataclass
class SplitReport:
    """What was found in one split; ``problems`` make it unusable, ``warnings`` do not."""

    dataset: str
    split: str
    num_queries: int = 0
    num_db: int = 0
    missing: int = 0
    decoded: int = 0
    undecodable: int = 0
    zone: str = "-"
    no_positive: int = 0
    duplicates: int = 0
    overlap: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def detect(root: Path) -> list[tuple[str, str | None, str]]:
    """(kind, scale, split) of every split under ``root``, by the files that define them."""
    found: list[tuple[str, str | None, str]] = []
    if (root / "train_val").is_dir():
        found.append(("msls", None, "val"))
        if all((root / "train_val" / c).is_dir() for c in msls.TRAIN_CITIES):
            found.append(("msls", None, "train"))
    found += [("folder", None, s) for s in SPLITS if (root / "images" / s / "database").is_dir()]
    for scale in ("30k", "250k"):
        found += [("pitts", scale, s) for s in SPLITS if (root / f"pitts{scale}_{s}.mat").is_file()]
    if (root / "tokyo247.mat").is_file():
        found.append(("tokyo247", None, "test"))
    found += [("tokyotm", None, s) for s in ("train", "val") if (root / f"tokyoTM_{s}.mat").is_file()]
    found += [("synthcity", None, s) for s in SPLITS if (root / f"synthcity_{s}.mat").is_file()]
    return found


def _sample(count: int, decode: int | None) -> np.ndarray:
    """Indices to decode: all (``decode`` None) or ``decode`` spread evenly over the list."""
    if decode is None or decode >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, decode).round().astype(np.int64))


def _listed(items: list[str], limit: int) -> str:
    more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_split(
    kind: str, root: Path, split: str, scale: str | None, decode: int | None, limit: int
) -> SplitReport:
    name = f"{kind}{scale or ''}"
    report = SplitReport(name, split)
    try:
        place = load_split(kind, root, split, scale=scale, check_images=False)
    except (OSError, ValueError) as exc:  # missing files and format errors, with their file
        report.problems.append(f"cannot be read: {exc}")
        return report
    report.num_queries, report.num_db = place.num_queries, place.num_db
    if place.num_queries == 0 or place.num_db == 0:
        report.problems.append(f"{place.num_queries} queries and {place.num_db} database images")
    paths = place.q_paths + place.db_paths
    missing = [str(p) for p in paths if not os.path.exists(p)]
    report.missing = len(missing)
    if missing:
        report.problems.append(f"{len(missing)} of {len(paths)} images missing: {_listed(missing, limit)}")
    present = [p for p in paths if os.path.exists(p)]
    broken = []
    for i in _sample(len(present), decode):
        try:
            load_rgb(present[i])
        except ImageLoadError as exc:
            broken.append(str(exc))
        report.decoded += 1
    report.undecodable = len(broken)
    if broken:
        report.problems.append(f"{len(broken)} of {report.decoded} images decoded fail: {_listed(broken, limit)}")
    _check_coordinates(kind, place, report)
    _check_names(place, report, limit)
    if kind == "msls" and split == "val":  # the protocol leaves these out; say which
        dropped = msls.read_protocol(root, msls.VAL_CITIES, radius=place.eval_radius).dropped
        if dropped:
            report.warnings.append(
                f"{len(dropped)} flagged queries have no positive within {place.eval_radius:g} m and are "
                f"left out, as the official protocol does: {_listed(dropped, limit)}"
            )
    no_positive = [place.q_rel[i] for i, p in enumerate(place.eval_positives()) if len(p) == 0]
    report.no_positive = len(no_positive)
    if no_positive:
        report.warnings.append(
            f"{len(no_positive)} queries have no database image within {place.eval_radius:g} m "
            f"(they count as misses): {_listed(no_positive, limit)}"
        )
    return report


def _check_coordinates(kind: str, place: PlaceSplit, report: SplitReport) -> None:
    for what, utm, rel in (("query", place.q_utm, place.q_rel), ("database", place.db_utm, place.db_rel)):
        bad = np.flatnonzero(~np.isfinite(utm).all(axis=1))
        if bad.size:
            report.problems.append(f"{bad.size} {what} images without finite UTM coordinates, e.g. {rel[bad[0]]}")
    if kind == "folder":  # only these names carry a zone (the loader refuses mixed zones)
        zones = {parse_utm_name(r).zone for r in place.q_rel + place.db_rel} - {None}
        report.zone = ",".join(sorted(zones)) or "-"
    else:  # known per dataset; MSLS cities each have their own
        report.zone = DATASET_ZONES.get(kind, "-")


def _check_names(place: PlaceSplit, report: SplitReport, limit: int) -> None:
    for what, rel in (("query", place.q_rel), ("database", place.db_rel)):
        twice = sorted(r for r, n in Counter(rel).items() if n > 1)
        report.duplicates += len(twice)
        if twice:
            report.problems.append(f"{len(twice)} {what} images listed more than once: {_listed(twice, limit)}")
    both = sorted({os.path.realpath(p) for p in place.q_paths} & {os.path.realpath(p) for p in place.db_paths})
    report.overlap = len(both)
    if both:
        # With time stamps (Tokyo TM) a query never is its own positive; elsewhere it would be.
        note = report.warnings if place.db_timestamps is not None else report.problems
        note.append(f"{len(both)} files are both query and database image: {_listed(both, limit)}")


def summary_table(reports: list[SplitReport]) -> str:
    header = ("dataset", "split", "queries", "database", "missing", "undecodable", "zone",
              "no positive", "duplicates", "q/db overlap", "status")
    rows = [header]
    for r in reports:
        status = "PROBLEM" if r.problems else "ok"
        rows.append((r.dataset, r.split, str(r.num_queries), str(r.num_db), str(r.missing),
                     f"{r.undecodable}/{r.decoded}", r.zone, str(r.no_positive), str(r.duplicates),
                     str(r.overlap), status))
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wakd.data.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="dataset root (the folder holding the .mat files, images/ or train_val/)")
    parser.add_argument("--decode", default="100", help="images to decode per split, spread evenly, or 'all' (default 100)")
    parser.add_argument("--list", type=int, default=10, help="file names listed per problem (default 10)")
    args = parser.parse_args(argv)
    if args.decode != "all" and not args.decode.isdigit():
        parser.error(f"--decode {args.decode}: a number of images or 'all'")
    decode = None if args.decode == "all" else int(args.decode)
    root = args.root.expanduser().absolute()
    found = detect(root)
    if not found:
        print(
            f"{root}: no dataset wakd reads (no *.mat split file, images/<split>/database/ or "
            "train_val/ found); see docs/data-formats.md", file=sys.stderr,
        )
        return 2
    reports = [check_split(kind, root, split, scale, decode, args.list) for kind, scale, split in found]
    print(summary_table(reports))
    for r in reports:
        for w in r.warnings:
            print(f"warning: {r.dataset} {r.split}: {w}")
    problems = [f"{r.dataset} {r.split}: {p}" for r in reports for p in r.problems]
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"{len(problems)} problem(s) in {len(reports)} split(s) under {root}" if problems
          else f"{len(reports)} split(s) under {root} usable")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
