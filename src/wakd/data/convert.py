"""Convert a NetVLAD ``.mat`` dataset to the UTM folder layout by symbolic links (no copies).

    python -m wakd.data.convert SRC DST [--kind pitts --scale 30k] [--zone 17T]

SRC is the folder holding the ``.mat`` files (e.g. ``datasets/data/pitts/raw``); every split
found there becomes ``DST/images/<split>/{database,queries}/`` of links named as
VPR-datasets-downloader names its files,
``@utm_e@utm_n@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg``,
with the zone (Pittsburgh 17T, Tokyo 54S unless ``--zone`` says otherwise), the capture month
(Tokyo TM) and the source path in ``note``; latitude and longitude stay empty. The folder
layout has no time stamps: Tokyo TM's rule that a positive be taken at another time is lost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from wakd.data.check import detect
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.utm_names import DATASET_ZONES, format_utm_name

MAT_KINDS = ("pitts", "tokyo247", "tokyotm", "synthcity")


def link_names(split: PlaceSplit, which: str, zone: str) -> list[str]:
    """Folder-format names of the ``query`` or ``database`` images of ``split``, in its order."""
    rel, utm = (split.q_rel, split.q_utm) if which == "query" else (split.db_rel, split.db_utm)
    stamps = split.q_timestamps if which == "query" else split.db_timestamps
    names = []
    for i, (r, (east, north)) in enumerate(zip(rel, utm, strict=True)):
        source = Path(r)
        if "@" in r:
            raise ValueError(f"{split.root / r}: '@' in a source name would break the UTM folder name")
        names.append(format_utm_name(
            east, north, zone, suffix=source.suffix.lower(),
            timestamp="" if stamps is None else int(stamps[i]),
            note=source.with_suffix("").as_posix().replace("/", "_"),
        ))
    return names


def _link_folder(split: PlaceSplit, which: str, zone: str, folder: Path) -> int:
    paths = split.q_paths if which == "query" else split.db_paths
    names = link_names(split, which, zone)
    seen: dict[str, Path] = {}
    folder.mkdir(parents=True)
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise ValueError(f"{path} and {seen[name]} would both become {folder / name}")
        seen[name] = path
        os.symlink(path.absolute(), folder / name)
    return len(names)


def convert_split(split: PlaceSplit, dst: Path, zone: str) -> dict[str, int]:
    """Write ``dst/images/<split>/`` in a temporary folder renamed at the end, so a
    half-converted split never looks complete."""
    final = dst / "images" / split.split
    if final.exists():
        raise FileExistsError(f"{final} exists; remove it or convert into another DST")
    tmp = final.with_name(f".{split.split}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {
            "database": _link_folder(split, "database", zone, tmp / "database"),
            "queries": _link_folder(split, "query", zone, tmp / "queries"),
        }
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wakd.data.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="folder with the NetVLAD .mat files and their images")
    parser.add_argument("dst", type=Path, help="UTM folder dataset to create (images/<split>/...)")
    parser.add_argument("--kind", choices=MAT_KINDS, help="which dataset, where SRC holds several")
    parser.add_argument("--scale", choices=("30k", "250k"), help="Pittsburgh variant, where SRC holds both")
    parser.add_argument("--zone", help="UTM zone written into the names, e.g. 17T (default: by dataset)")
    args = parser.parse_args(argv)
    src = args.src.expanduser().absolute()
    found = [
        (kind, scale, split) for kind, scale, split in detect(src)
        if kind in MAT_KINDS and (args.kind in (None, kind)) and (args.scale in (None, scale))
    ]
    datasets = sorted({(kind, scale) for kind, scale, _ in found}, key=str)
    if len(datasets) != 1:
        what = ", ".join(f"{k}{s or ''}" for k, s in datasets) or "no NetVLAD .mat split file"
        print(f"{src}: found {what}; choose one with --kind (and --scale)", file=sys.stderr)
        return 2
    kind, scale = datasets[0]
    zone = DATASET_ZONES.get(kind, "") if args.zone is None else args.zone
    try:
        for _, _, split_name in found:
            split = load_split(kind, src, split_name, scale=scale)
            counts = convert_split(split, args.dst.expanduser().absolute(), zone)
            print(f"{kind}{scale or ''} {split_name}: {counts['database']} database images, "
                  f"{counts['queries']} queries linked into {args.dst / 'images' / split.split}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if kind == "tokyotm":
        print("note: the folder layout has no time stamps; Tokyo TM's different-time rule is not kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
