"""Summarise a NetVLAD ``.mat`` file: ``python -m wakd.data.mat_summary FILE.mat`` prints one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wakd.data.ground_truth import radius_positives
from wakd.data.netvlad_mat import DatasetFormatError, load_dbstruct


def summarise(path: str | Path) -> dict[str, Any]:
    """Counts of images and of queries with training (10 m) and evaluation (25 m) positives."""
    db = load_dbstruct(path)
    timestamps = (db.db_timestamps, db.q_timestamps)
    train_pos = radius_positives(db.db_utm, db.q_utm, db.train_pos_radius, *timestamps)
    eval_pos = radius_positives(db.db_utm, db.q_utm, db.pos_dist_thr, *timestamps)
    return {
        "file": str(path),
        "split": db.split,
        "num_db": db.num_db,
        "num_queries": db.num_queries,
        "num_queries_with_train_positive": sum(len(p) > 0 for p in train_pos),
        "num_queries_with_eval_positive": sum(len(p) > 0 for p in eval_pos),
        "train_pos_radius": db.train_pos_radius,
        "eval_radius": db.pos_dist_thr,
        "has_timestamps": db.has_timestamps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wakd.data.mat_summary", description=__doc__)
    parser.add_argument("mat", help="a NetVLAD dbStruct .mat file (e.g. pitts30k_train.mat)")
    args = parser.parse_args(argv)
    try:
        summary = summarise(args.mat)
    except (FileNotFoundError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
