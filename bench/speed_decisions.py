#!/usr/bin/env python
"""Issue 32: does each speed optimisation pay its way? The optimised path against the plain
one, side by side on the workload it serves, interleaved, medians; kept where >= 1.2x.

Kept, and benchmarked here against its plain path (defined in this file):

* ``mining``: a round's query-candidate distances in fp32 by the norm formula, with a proven
  error bound and exact re-scoring of the near ties only, read off the re-ranking graph's
  pass when there is one (``cross_pair_sq_distances``, ``formula_error_bound``,
  ``k_smallest_per_list``, ``knn_graph(pairs=)``) -- plain: every pair's distance exact in
  float64 from one GEMM per database chunk, then a stable sort of each list. Workload:
  ``TupleMiner.mine`` of the demo city's round (1,000 queries, descriptors of the demo
  student), generation 0 and re-ranked, and of a Pitts30k-size split (10k queries x 10k
  database, 4,096-d fp16 descriptors, generation 0).

Removed in issue 32 (the syrk diagonal blocks, radix grouping, retain_freed_memory, q_chunk
16384, the JPEG marker parser): this script at commit 2ed0bfe benchmarks them against the
library of that commit; the figures are in bench/RESULTS.md.

Prints one JSON row per decision and workload; the figures go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from p1_speedup import THREADS  # noqa: E402
from p6_mining_round import MINER, build_demo_student, demo_root  # noqa: E402

from wakd.data import rerank as rerank_module  # noqa: E402
from wakd.data import tuple_miner  # noqa: E402
from wakd.data.datamodule import split_images  # noqa: E402
from wakd.data.datasets import PlaceSplit, load_split  # noqa: E402
from wakd.data.images import build_transform  # noqa: E402
from wakd.describe import extract_descriptors, split_descriptors  # noqa: E402

GOAL = 1.2


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def interleaved(
    variants: dict[str, Callable[[], object]], reps: int
) -> tuple[dict[str, list[float]], dict]:
    """Seconds of each variant over ``reps`` interleaved repetitions after one warm-up,
    and each variant's warm-up result (to check they agree)."""
    results = {name: run() for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times, results


def report(title: str, times: dict[str, list[float]], load: tuple[str, str]) -> dict:
    (opt, t_opt), (plain, t_plain) = list(times.items())[:2]
    m_opt, m_plain = statistics.median(t_opt), statistics.median(t_plain)
    row = {"decision": title, "optimised": opt, "plain": plain, "optimised_s": round(m_opt, 3),
           "plain_s": round(m_plain, 3), "ratio": round(m_plain / m_opt, 3), "reps": len(t_opt),
           "load_start": load[0], "load_end": load[1],
           "all": {k: [round(x, 3) for x in v] for k, v in times.items()}}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- mining: the plain path


def plain_cross_pair_sq_distances(queries, database, rows, cols, chunk: int = 4096) -> np.ndarray:
    """Exact (float64) squared distances [P] of (queries[rows[p]], database[cols[p]]):
    one float64 GEMM of the queries against each database chunk, read off at the pairs."""
    out = np.empty(len(cols), dtype=np.float64)
    q64 = queries.astype(np.float64)
    q_norms = np.einsum("md,md->m", q64, q64)
    order = np.argsort(cols // chunk, kind="stable")
    sorted_chunks = (cols // chunk)[order]
    for d0 in range(0, len(database), chunk):
        lo, hi = np.searchsorted(sorted_chunks, [d0 // chunk, d0 // chunk + 1])
        sel = order[lo:hi]
        if not len(sel):
            continue
        b64 = database[d0 : d0 + chunk].astype(np.float64)
        gram = q64 @ b64.T  # [M,c]
        r, c = rows[sel], cols[sel] - d0
        out[sel] = q_norms[r] + np.einsum("cd,cd->c", b64, b64)[c] - 2.0 * gram[r, c]
    return out


def plain_k_smallest_per_list(approx, bound, lengths, k, exact) -> tuple[np.ndarray, np.ndarray]:
    """k smallest of each list from exact values: a stable sort by (list, value)."""
    del bound, exact  # the values are exact already
    lengths = np.asarray(lengths, dtype=np.int64)
    group = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((approx, group))  # stable: among equal values the earlier position
    listed = group[order]
    rank = np.arange(len(order)) - np.searchsorted(listed, listed)
    keep = rank < k
    return order[keep], np.asarray(approx, dtype=np.float64)[order[keep]]


def plain_reranking_graph(features, *, k1, k2, device, pairs):
    graph = rerank_module.reranking_graph(features, k1=k1, k2=k2, device=device)
    firsts, rows = np.unique(pairs[0], return_inverse=True)
    return graph._replace(
        pair_distances=plain_cross_pair_sq_distances(features[firsts], features, rows, pairs[1])
    )


def plain_mining():
    return mock.patch.multiple(
        tuple_miner,
        cross_pair_sq_distances=plain_cross_pair_sq_distances,
        formula_error_bound=lambda dim, s: 0.0,
        k_smallest_per_list=plain_k_smallest_per_list,
        reranking_graph=plain_reranking_graph,
    )


def tuples_key(tuples) -> list:
    return [(t.query, t.hard_positive, t.negatives.tolist(), t.positives.tolist()) for t in tuples]


def mine_variant(
    split, q_desc, db_desc, queries, rerank, patch, reps_seed: list[int]
) -> Callable[[], list]:
    """One ``TupleMiner.mine`` per call, each variant with its own miner and the same draws."""
    miner = tuple_miner.TupleMiner(split, **MINER)

    def run() -> list:
        rng = np.random.default_rng([0, reps_seed[0]])
        with patch() if patch else contextlib.nullcontext():
            return tuples_key(miner.mine(queries, q_desc, db_desc, rng, rerank=rerank))

    return run


def pitts_size_split(
    num_db: int = 10_000, num_q: int = 10_000, seed: int = 0
) -> tuple[PlaceSplit, np.ndarray, np.ndarray]:
    """A Pitts30k-size split (24 images per place, places 8 m apart along streets; queries
    within 3 m of a place) with place-structured unit descriptors in fp16, 4,096-d."""
    rng = np.random.default_rng(seed)
    db_place = np.arange(num_db) // 24
    places = db_place[-1] + 1
    place_utm = np.stack([np.arange(places) * 8.0, np.zeros(places)], axis=1)
    q_place = rng.integers(0, places, num_q)
    q_utm = place_utm[q_place] + rng.uniform(-3, 3, (num_q, 2))
    centres = rng.standard_normal((places, 4096)).astype(np.float32)

    def describe(place: np.ndarray) -> np.ndarray:
        x = centres[place] + 1.5 * rng.standard_normal((len(place), 4096)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    split = PlaceSplit("pitts30k", "train", Path("/nonexistent"), [f"db{i}.jpg" for i in range(num_db)],
                       [f"q{i}.jpg" for i in range(num_q)], place_utm[db_place], q_utm)  # fmt: skip
    return split, describe(q_place), describe(db_place)


def demo_descriptors(root: Path) -> tuple[PlaceSplit, np.ndarray, np.ndarray]:
    split = load_split("synthcity", root, "train")
    torch.manual_seed(0)
    net = build_demo_student()
    extraction = extract_descriptors(net, split_images(split, build_transform((96, 128), train=False)),
                                     batch_size=16, num_workers=2, progress=False)  # fmt: skip
    q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
    return split, q_desc, db_desc


def bench_mining(name: str, split, q_desc, db_desc, num_queries: int, rerank: bool, reps: int,
                 decisions: list[str]) -> list[dict]:  # fmt: skip
    """The optimised mine and each decision's plain variant, all interleaved."""
    miner = tuple_miner.TupleMiner(split, **MINER)
    queries = np.random.default_rng([0, 0]).permutation(miner.queries)[:num_queries]
    seed = [0]
    patches = {"mining": plain_mining}
    variants = {"optimised": mine_variant(split, q_desc, db_desc, queries, rerank, None, seed)}
    for decision in decisions:
        variants[f"plain {decision}"] = mine_variant(
            split, q_desc, db_desc, queries, rerank, patches[decision], seed
        )
    load = loadavg()
    times, results = interleaved(variants, reps)
    load = (load, loadavg())
    rows = []
    for decision in decisions:
        plain = f"plain {decision}"
        row = report(f"{decision}: {name}{' re-ranked' if rerank else ''}",
                     {"optimised": times["optimised"], plain: times[plain]}, load)  # fmt: skip
        row["same_tuples"] = results["optimised"] == results[plain]
        print(f"  same tuples: {row['same_tuples']}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=["demo", "pitts"], help="workloads: demo, pitts")
    ap.add_argument(
        "--root", type=Path, help="a demo city's .mat folder (default: the project's, or a new one)"
    )
    ap.add_argument("--out", type=Path, help="append each row as JSON to this file")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    )
    print(f"threads {THREADS}; cores {os.cpu_count()}; git {head.stdout.strip()}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wakd-speed-") as tmp:
        if "demo" in args.only:
            split, q_desc, db_desc = demo_descriptors(args.root or demo_root(Path(tmp)))
            for rerank in (False, True):
                rows += bench_mining(
                    "demo", split, q_desc, db_desc, 1000, rerank, args.reps, ["mining"]
                )
    if "pitts" in args.only:
        split, q_desc, db_desc = pitts_size_split()
        rows += bench_mining(
            "Pitts30k size", split, q_desc, db_desc, 10_000, False, args.reps, ["mining"]
        )
    if args.out:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
