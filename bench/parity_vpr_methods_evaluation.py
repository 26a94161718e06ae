#!/usr/bin/env python
"""Parity with VPR-methods-evaluation: the same descriptors, its Recall@N and wakd's, query by query.

    python bench/parity_vpr_methods_evaluation.py --vpr-eval DIR/VPR-methods-evaluation \
        --vpr-eval-deps DIR/vpr-eval-deps

1. The synthetic city (preset demo, seed 0) is generated and its test split converted to the
   UTM folder layout by ``python -m wakd.data.convert`` (symbolic links).
2. wakd reads the folder (``load_split("folder")``), describes every image with the raw-pixel
   model (24 x 32 x 3, zero-padded to 4,096) and ranks with ``wakd.eval.retrieval.retrieve``
   (exact search, 25 m positives).
3. VPR-methods-evaluation's own ``main.main`` runs, unmodified, in a child process on the same
   folders, from a checkout outside the project (``--vpr-eval``; it needs ``loguru``, found on
   ``--vpr-eval-deps``), with its model replaced by one that hands back wakd's descriptors in
   its image order; its faiss index is wrapped only to record the predictions it returns.
4. Compared: the positives of every query (as files), the top-20 lists (as files), whether each
   query is found at N = 1, 5, 10, 20, and Recall@N (wakd's fractions against the percentages
   VPR-methods-evaluation prints).

Prints one JSON object; exits 1 when any query disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NS = (1, 5, 10, 20)
DIM = 4096


def found_at(topk: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """[Q, len(NS)] bool: a positive among the first N retrievals."""
    return np.array([[np.isin(row[:n], pos).any() for n in NS] for row, pos in zip(topk, positives, strict=True)])


def wakd_side(city: Path, folder: Path, out: Path) -> dict:
    """Describe the converted folder with wakd, rank and score it; descriptors saved by path."""
    import torch

    from wakd.data import convert
    from wakd.data.datamodule import split_images
    from wakd.data.datasets import load_split
    from wakd.data.images import build_transform
    from wakd.describe import extract_descriptors, split_descriptors
    from wakd.eval.retrieval import retrieve
    from wakd.synth.rawpixels import RawPixels
    from wakd.synth.synthcity import generate_city

    generate_city(city, preset="demo", seed=0, progress=False)
    if convert.main([str(city / "synthcity" / "raw"), str(folder)]) != 0:
        raise RuntimeError("conversion failed")
    split = load_split("folder", folder, "test")
    torch.manual_seed(0)
    images = split_images(split, build_transform((96, 128), train=False))
    extraction = extract_descriptors(RawPixels(), images, batch_size=32, num_workers=0, progress=False)
    # Zero-padded to 4,096 (VPR-methods-evaluation's parser takes its dimension from a method
    # list); zeros change no distance. Both sides get these very arrays.
    q_desc, db_desc = (
        np.pad(np.asarray(d, dtype=np.float32), ((0, 0), (0, DIM - d.shape[1])))
        for d in split_descriptors(extraction, [split.num_queries, split.num_db])
    )
    recall, topk, _ = retrieve(q_desc, db_desc, split, NS)
    paths = [os.path.normpath(p) for p in split.q_paths + split.db_paths]
    np.save(out / "descriptors.npy", np.concatenate([q_desc, db_desc]))
    (out / "paths.json").write_text(json.dumps(paths))
    return {
        "num_queries": split.num_queries,
        "num_database": split.num_db,
        "dim": int(q_desc.shape[1]),
        "recall": {str(n): r for n, r in recall.items()},
        "q_paths": paths[: split.num_queries],
        "db_paths": paths[split.num_queries :],
        "topk": topk.tolist(),
        "positives": [p.tolist() for p in split.eval_positives()],
    }


def replay(vpr_eval: Path, folder: Path, work: Path) -> None:
    """Child process: VPR-methods-evaluation's main() with wakd's descriptors replayed."""
    import types

    import faiss
    import torch

    sys.path.insert(0, str(vpr_eval))
    from test_dataset import read_images_paths

    descriptors = np.load(work / "descriptors.npy")
    row_of = {p: i for i, p in enumerate(json.loads((work / "paths.json").read_text()))}
    db_folder, q_folder = str(folder / "images/test/database"), str(folder / "images/test/queries")
    order = [row_of[os.path.normpath(p)] for p in read_images_paths(db_folder) + read_images_paths(q_folder)]
    rows = torch.from_numpy(descriptors[order])  # database then queries, in its order

    class Replay(torch.nn.Module):
        """Its main() describes the database, then the queries, each in list order."""

        def __init__(self) -> None:
            super().__init__()
            self.next = 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out = rows[self.next : self.next + len(images)]
            self.next += len(images)
            return out

    recorded = {}

    class RecordingIndex(faiss.IndexFlatL2):
        def search(self, x, k, *args, **kwargs):
            distances, predictions = super().search(x, k, *args, **kwargs)
            recorded["predictions"] = predictions
            return distances, predictions

    sys.modules["vpr_models"] = types.SimpleNamespace(get_model=lambda *a, **k: Replay())
    faiss.IndexFlatL2 = RecordingIndex
    import main as vpr_main
    import parser as vpr_parser
    from test_dataset import TestDataset

    positives_seen = {}
    original = TestDataset.get_positives

    def get_positives(self):
        positives_seen["value"] = original(self)
        return positives_seen["value"]

    TestDataset.get_positives = get_positives
    sys.argv = [
        "main.py", "--database_folder", db_folder, "--queries_folder", q_folder, "--device", "cpu",
        "--num_workers", "0", "--descriptors_dimension", str(rows.shape[1]), "--method", "netvlad",
        "--recall_values", *map(str, NS),
    ]
    os.chdir(work)  # its logs/ folder
    vpr_main.main(vpr_parser.parse_arguments())
    (work / "vpr_eval.json").write_text(json.dumps({
        "db_paths": [os.path.normpath(p) for p in read_images_paths(db_folder)],
        "q_paths": [os.path.normpath(p) for p in read_images_paths(q_folder)],
        "predictions": recorded["predictions"].tolist(),
        "positives": [np.asarray(p).tolist() for p in positives_seen["value"]],
    }))


def compare(wakd: dict, theirs: dict, printed: dict[str, float]) -> dict:
    """Everything keyed by file path, so the two image orders do not matter."""
    w_q = {p: i for i, p in enumerate(wakd["q_paths"])}
    t_q = [w_q[p] for p in theirs["q_paths"]]  # their query i is wakd's query t_q[i]
    w_db, t_db = np.array(wakd["db_paths"]), np.array(theirs["db_paths"])
    w_topk = np.array(wakd["topk"])[t_q]
    t_topk = np.array(theirs["predictions"])
    same_positives = sum(
        set(w_db[wakd["positives"][w]]) == set(t_db[np.asarray(theirs["positives"][i], dtype=np.int64)])
        for i, w in enumerate(t_q)
    )
    same_top20 = int((w_db[w_topk] == t_db[t_topk]).all(axis=1).sum())
    w_found = found_at(w_topk, [np.asarray(wakd["positives"][w], dtype=np.int64) for w in t_q])
    t_found = found_at(t_topk, [np.asarray(p, dtype=np.int64) for p in theirs["positives"]])
    disagree = int((w_found != t_found).any(axis=1).sum())
    return {
        "queries": len(t_q),
        "same_positives": int(same_positives),
        "same_top20": same_top20,
        "queries_disagreeing_on_found_at_N": disagree,
        "recall_wakd_percent": {k: round(100 * v, 4) for k, v in wakd["recall"].items()},
        "recall_vpr_eval_recomputed_percent": {str(n): round(100 * float(t_found[:, j].mean()), 4) for j, n in enumerate(NS)},
        "recall_vpr_eval_printed_percent": printed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vpr-eval", type=Path, required=True, help="a VPR-methods-evaluation checkout")
    parser.add_argument("--vpr-eval-deps", type=Path, required=True, help="a folder with its extra dependencies")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--replay", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.replay:
        replay(args.vpr_eval, args.replay / "folder", args.replay)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="wakd_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    wakd = wakd_side(work / "city", work / "folder", work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.vpr_eval_deps), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run(
        [sys.executable, __file__, "--replay", str(work), "--vpr-eval", str(args.vpr_eval)],
        env=env, capture_output=True, text=True,
    )
    if child.returncode != 0:
        print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
        return 2
    line = re.search(r"R@1: .*", child.stdout)
    printed = dict(re.findall(r"R@(\d+): ([\d.]+)", line.group(0))) if line else {}
    result = compare(wakd, json.loads((work / "vpr_eval.json").read_text()), {k: float(v) for k, v in printed.items()})
    result["vpr_eval_commit"] = subprocess.run(
        ["git", "-C", str(args.vpr_eval), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result["dataset"] = "synthcity demo seed 0, test split, converted to the UTM folder layout"
    print(json.dumps(result, indent=1))
    return 0 if result["queries_disagreeing_on_found_at_N"] == 0 and result["same_positives"] == result["queries"] else 1


if __name__ == "__main__":
    sys.exit(main())
