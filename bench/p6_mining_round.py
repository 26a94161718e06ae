#!/usr/bin/env python
"""P6 benchmark: cost of one mining round over describing the training images alone.

    p6_mining_round_ratio = wall s of a mining round (describe every training query and
        database image, then mine the round's 1,000 queries) / wall s of the describing alone

On the demo city's training split (seed 0: 1,000 queries, 1,648 database images, 96x128),
as ``TupleMining.mine`` runs a round: ``extract_descriptors`` of the queries then the
database images (the default inference path, re-optimised every call as after each round's
weight change; ``eval_batch_size`` 16, ``num_workers`` 2), then ``TupleMiner.mine`` with
``configs/datamodule/tuples.yaml``'s settings. The student is the demo's (MobileNetV3-L
at stride 16, 1x1 -> 128, NetVLAD-32: 4,096-d), random weights with k-means NetVLAD.
Two rounds are timed: generation 0 (no re-ranking) and a later generation (positives
re-ranked by the k-reciprocal distance over all training images, SFRS's rule from
generation 1 on: most rounds of a fit); the headline is the later one. Describing alone
and both rounds run interleaved in one process; medians. Goal <= 1.2.
Writes p6_* keys into bench/results.json and the <!-- p6 --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from p1_speedup import THREADS, init_netvlad, load_average

from wakd.data.datamodule import split_images
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import build_transform
from wakd.data.tuple_miner import TupleMiner
from wakd.describe import extract_descriptors, split_descriptors
from wakd.models import PlaceNet, build_place_net

REPO = Path(__file__).resolve().parents[1]
DEMO_ROOT = REPO / "datasets" / "data" / "synthcity" / "raw"
IMAGE_SIZE = (96, 128)
QUERIES = 1000  # configs/datamodule/tuples.yaml: cache_size
BATCH, WORKERS = 16, 2  # ... eval_batch_size, num_workers
MINER = dict(pos_num=3, neg_num=3, pos_pool=20, neg_pool=1000, rerank_k1=20, rerank_k2=1,
             rerank_lambda=0.1, rerank_select="gain")  # ... the rest of tuples.yaml
GOAL = 1.2


def demo_root(workdir: Path) -> Path:
    """The demo city's .mat folder (generated into ``workdir`` if the project has none)."""
    if (DEMO_ROOT / "synthcity_train.mat").is_file():
        return DEMO_ROOT
    subprocess.run([sys.executable, "-m", "wakd.synth.synthcity", "--out", str(workdir), "--preset", "demo",
                    "--seed", "0", "--quiet"], check=True)  # fmt: skip
    return workdir / "synthcity" / "raw"


def build_demo_student() -> PlaceNet:
    """The demo's student (src/wakd/synth/demo.py STUDENT), random weights, k-means NetVLAD."""
    net = build_place_net("mobilenetv3_large", cut="stride16", proj_dim=128, num_clusters=32, bn_momentum=0.1)
    return init_netvlad(net, torch.rand(9, 3, *IMAGE_SIZE))


class Round:
    """One variant of a mining round with its own miner (each keeps its last negatives)."""

    def __init__(self, split: PlaceSplit, net: PlaceNet, rerank: bool | None) -> None:
        self.split, self.net, self.rerank = split, net, rerank  # rerank None: describe only
        self.images = split_images(split, build_transform(IMAGE_SIZE, train=False))
        self.miner = TupleMiner(split, **MINER)
        self.queries = np.random.default_rng([0, 0]).permutation(self.miner.queries)[:QUERIES]
        self.calls = 0

    def __call__(self) -> float:
        start = time.perf_counter()
        extraction = extract_descriptors(self.net, self.images, batch_size=BATCH, num_workers=WORKERS,
                                         progress=False)  # fmt: skip
        if self.rerank is not None:
            q_desc, db_desc = split_descriptors(extraction, [self.split.num_queries, self.split.num_db])
            rng = np.random.default_rng([0, 1_000_003, self.calls])
            self.miner.mine(self.queries, q_desc, db_desc, rng, rerank=self.rerank)
        self.calls += 1
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed repetitions after a warm-up (a round varies by 0.3 s here)")
    ap.add_argument("--root", type=Path, help="a demo city's .mat folder (default: the project's, or a new one)")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="wakd-p6-") as tmp:
        root = args.root or demo_root(Path(tmp))
        split = load_split("synthcity", root, "train")
        net = build_demo_student()
        variants = {
            "describe all training images": Round(split, net, None),
            "round, generation 0 (describe + mine)": Round(split, net, False),
            "round, generation >= 1 (describe + mine, re-ranked positives)": Round(split, net, True),
        }
        load_start = load_average()
        for run in variants.values():  # warm-up: first ONNX export, page cache, miner memory
            run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(run())
        load_end = load_average()
    medians = {name: statistics.median(t) for name, t in times.items()}
    describe, gen0, later = medians.values()
    ratio, ratio_gen0 = later / describe, gen0 / describe
    for name, t in times.items():
        print(f"{name}: median {medians[name]:.2f} s ({' '.join(f'{x:.2f}' for x in t)})")
    print(f"p6_mining_round_ratio = {ratio:.3f} (generation 0: {ratio_gen0:.3f})")
    if args.no_write:
        return

    from _results import machine, merge_results, replace_section

    merge_results({
        "p6_mining_round_ratio": round(ratio, 3),
        "p6_mining_round_ratio_gen0": round(ratio_gen0, 3),
        "p6_describe_seconds": round(describe, 2),
    }, load=f"{load_start} -> {load_end}")  # fmt: skip
    rows = "\n".join(
        f"| {name} | {medians[name]:.2f} | {medians[name] / describe:.2f} | {' '.join(f'{x:.2f}' for x in t)} |"
        for name, t in times.items()
    )
    met = "met" if ratio <= GOAL else "NOT met"
    replace_section(
        "p6",
        f"""
## P6: a mining round against describing alone (`bench/p6_mining_round.py`)

Machine: {machine()}; {THREADS} threads; load average {load_start} at the start, {load_end}
at the end (shared cores: compare the ratios, measured interleaved in one process). Demo
city, seed 0, training split ({split.num_queries:,} queries + {split.num_db:,} database
images, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}); the demo's student (MobileNetV3-L at stride 16,
1x1 -> 128, NetVLAD-32, random weights) on the default inference path, batch {BATCH},
`num_workers={WORKERS}`. A round = what `TupleMining.mine` does: describe every training
image, then `TupleMiner.mine` {QUERIES:,} queries (`tuples.yaml`: 1,000 negative
candidates + last round's hardest per query, pools of 20 positives, re-ranking k1 = 20,
k2 = 1, lambda = 0.1). Median of {args.rounds} after a warm-up.

| run | median s | / describe | s per repetition |
|---|---:|---:|---|
{rows}

**p6_mining_round_ratio = {ratio:.2f}** (generation >= 1; goal <= {GOAL}: {met});
generation 0: {ratio_gen0:.2f}.
""",
    )


if __name__ == "__main__":
    main()
