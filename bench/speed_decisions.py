#!/usr/bin/env python
"""Issue 32: does each speed optimisation pay its way? The optimised path against the plain
one, side by side on the workload it serves, interleaved, medians; kept where >= 1.2x.

Decisions (the "plain" path of each is defined here, the optimised one is the library's
as of the commit the figures name):

* ``mining``: a round's query-candidate distances in fp32 by the norm formula, with a proven
  error bound and exact re-scoring of the near ties only, read off the re-ranking graph's
  pass when there is one (``cross_pair_sq_distances``, ``formula_error_bound``,
  ``k_smallest_per_list``, ``knn_graph(pairs=)``) -- plain: every pair's distance exact in
  float64 from one GEMM per database chunk, then a stable sort of each list.
* ``syrk``: the graph pass's diagonal blocks by ssyrk (half the multiply-adds) and mirrored
  -- plain: sgemm. ``radix``: pairs grouped by block with 16-bit sort keys -- plain: argsort.
  Workload of all three: ``TupleMiner.mine`` of a Pitts30k-size split (10k queries x 10k
  database, 4,096-d fp16 descriptors, generation 0) and of the demo city's round (1,000
  queries, descriptors of the demo student), generation 0 and re-ranked.
* ``allocator``: ``retain_freed_memory()`` (glibc mallopt) against glibc's defaults, one
  process each (the setting is process-wide), alternating; the demo round's mining.
* ``q_chunk``: ``knn_search`` with q_chunk=16384 (queries converted to fp32 once) against
  4,096 (converted per database chunk); 10k fp16 queries x 10k database, 4,096-d.
* ``jpeg``: the hand-written JPEG marker parser against reading the header with PIL;
  ``extract_descriptors`` of 100 JPEGs at 480x640 with the student (default path).

Prints a table; the figures go into bench/RESULTS.md by hand (they decide code, once).
"""

from __future__ import annotations

import argparse
import io
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
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from p1_speedup import THREADS, build_student, init_netvlad  # noqa: E402
from p2_extraction import upscaled_jpegs  # noqa: E402
from p6_mining_round import MINER, build_demo_student, demo_root  # noqa: E402

from wakd import knn  # noqa: E402
from wakd.data import images, mining  # noqa: E402
from wakd.data import rerank as rerank_module  # noqa: E402
from wakd.data.datamodule import split_images  # noqa: E402
from wakd.data.datasets import PlaceSplit, load_split  # noqa: E402
from wakd.data.images import ImageListDataset, build_transform  # noqa: E402
from wakd.data.mining import TupleMiner  # noqa: E402
from wakd.describe import extract_descriptors, split_descriptors  # noqa: E402
from wakd.models.inference import optimize_for_inference  # noqa: E402

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
        mining,
        cross_pair_sq_distances=plain_cross_pair_sq_distances,
        formula_error_bound=lambda dim, s: 0.0,
        k_smallest_per_list=plain_k_smallest_per_list,
        reranking_graph=plain_reranking_graph,
    )


def plain_syrk():
    def sgemm_square(alpha, a, beta, c, trans, overwrite_c):
        return knn.sgemm(alpha, a, a, beta=beta, trans_a=trans, c=c, overwrite_c=overwrite_c)

    return mock.patch.multiple(knn, ssyrk=sgemm_square, _mirror_lower=lambda square: None)


def plain_group_by(labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(num_labels + 1))


def plain_radix():
    return mock.patch.object(knn, "_group_by", plain_group_by)


def tuples_key(tuples) -> list:
    return [(t.query, t.hard_positive, t.negatives.tolist(), t.positives.tolist()) for t in tuples]


def mine_variant(
    split, q_desc, db_desc, queries, rerank, patch, reps_seed: list[int]
) -> Callable[[], list]:
    """One ``TupleMiner.mine`` per call, each variant with its own miner and the same draws."""
    miner = TupleMiner(split, **MINER)

    def run() -> list:
        rng = np.random.default_rng([0, reps_seed[0]])
        with patch() if patch else _null():
            return tuples_key(miner.mine(queries, q_desc, db_desc, rng, rerank=rerank))

    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
    miner = TupleMiner(split, **MINER)
    queries = np.random.default_rng([0, 0]).permutation(miner.queries)[:num_queries]
    seed = [0]
    patches = {"mining": plain_mining, "syrk": plain_syrk, "radix": plain_radix}
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


# ---------------------------------------------------------------- allocator (child processes)

CHILD = """
import sys, time, json, numpy as np
sys.path.insert(0, {bench!r})
from p6_mining_round import MINER
from wakd.allocator import retain_freed_memory
from wakd.data.datasets import load_split
from wakd.data.mining import TupleMiner
if sys.argv[1] == "retain":
    assert retain_freed_memory()
split = load_split("synthcity", {root!r}, "train")
q_desc, db_desc = np.load({q!r}), np.load({db!r})
out = {{}}
for rerank in (False, True):
    miner = TupleMiner(split, **MINER)
    queries = np.random.default_rng([0, 0]).permutation(miner.queries)[:1000]
    times = []
    for rep in range(3):  # warm-up, then 2 timed
        start = time.perf_counter()
        miner.mine(queries, q_desc, db_desc, np.random.default_rng([0, rep]), rerank=rerank)
        times.append(time.perf_counter() - start)
    out[str(rerank)] = times[1:]
print(json.dumps(out))
"""


def bench_allocator(root: Path, q_desc, db_desc, tmp: Path, reps: int) -> list[dict]:
    np.save(tmp / "q.npy", q_desc)
    np.save(tmp / "db.npy", db_desc)
    code = CHILD.format(
        bench=str(BENCH), root=str(root), q=str(tmp / "q.npy"), db=str(tmp / "db.npy")
    )
    times = {mode: {"False": [], "True": []} for mode in ("retain", "default")}
    load = loadavg()
    for _ in range(reps):
        for mode in times:
            out = subprocess.run(
                [sys.executable, "-c", code, mode], check=True, capture_output=True, text=True
            )
            for key, t in json.loads(out.stdout.strip().splitlines()[-1]).items():
                times[mode][key].extend(t)
    rows = []
    for key, label in (("False", "generation 0"), ("True", "re-ranked")):
        rows.append(report(f"allocator: demo mine {label}",
                           {"retain_freed_memory": times["retain"][key], "glibc defaults": times["default"][key]},
                           (load, loadavg())))  # fmt: skip
    return rows


# ---------------------------------------------------------------- q_chunk


def bench_q_chunk(reps: int) -> list[dict]:
    rng = np.random.default_rng(1)
    db = rng.standard_normal((10_000, 4096)).astype(np.float16)
    q = rng.standard_normal((10_000, 4096)).astype(np.float16)
    variants = {
        "q_chunk=16384": lambda: knn.knn_search(db, q, 25, q_chunk=16384, use_gpu=False),
        "q_chunk=4096": lambda: knn.knn_search(db, q, 25, q_chunk=4096, use_gpu=False),
    }
    load = loadavg()
    times, results = interleaved(variants, reps)
    a, b = results.values()
    row = report("q_chunk: knn_search 10k x 10k fp16", times, (load, loadavg()))
    row["same_neighbours"] = bool(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]))
    print(f"  same neighbours: {row['same_neighbours']}", flush=True)
    return [row]


# ---------------------------------------------------------------- JPEG header


def pil_jpeg_frame(data: bytes | bytearray) -> tuple[int, int, int] | None:
    """(height, width, components) of a JPEG as PIL reads its header (no decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return None
            return image.height, image.width, len(image.getbands())
    except (OSError, SyntaxError, ValueError):
        return None


def bench_jpeg(root: Path, tmp: Path, reps: int, count: int = 100) -> list[dict]:
    demo = sorted((root / "images").rglob("*.jpg"))[:count]
    large = upscaled_jpegs(demo, tmp / "large", (480, 640))
    student = build_student()
    init_netvlad(student, torch.randn(9, 3, 480, 640))
    net = optimize_for_inference(student, torch.randn(1, 3, 480, 640))
    dataset = ImageListDataset(large, build_transform((480, 640), train=False))

    def extract() -> np.ndarray:
        return extract_descriptors(
            net, dataset, batch_size=8, num_workers=2, progress=False
        ).descriptors

    def extract_plain() -> np.ndarray:
        with mock.patch.object(images, "jpeg_frame", pil_jpeg_frame):
            return extract()

    def load_all() -> list:
        return [dataset[i][0] for i in range(len(dataset))]

    def load_all_plain() -> list:
        with mock.patch.object(images, "jpeg_frame", pil_jpeg_frame):
            return load_all()

    rows = []
    for title, variants in (
        (
            "jpeg: extract_descriptors 480x640",
            {"marker parser": extract, "PIL header": extract_plain},
        ),
        (
            "jpeg: loading alone 480x640 (context)",
            {"marker parser": load_all, "PIL header": load_all_plain},
        ),
    ):
        load = loadavg()
        times, results = interleaved(variants, reps)
        a, b = results.values()
        row = report(title, times, (load, loadavg()))
        row["same_output"] = all(
            torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b, strict=True)
        )
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=["demo", "allocator", "q_chunk", "jpeg", "pitts"])
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
        tmp = Path(tmp)
        root = (
            args.root or demo_root(tmp) if {"demo", "allocator", "jpeg"} & set(args.only) else None
        )
        if {"demo", "allocator"} & set(args.only):
            split, q_desc, db_desc = demo_descriptors(root)
            if "demo" in args.only:
                rows += bench_mining(
                    "demo", split, q_desc, db_desc, 1000, False, args.reps, ["mining"]
                )
                rows += bench_mining(
                    "demo",
                    split,
                    q_desc,
                    db_desc,
                    1000,
                    True,
                    args.reps,
                    ["mining", "syrk", "radix"],
                )
            if "allocator" in args.only:
                rows += bench_allocator(root, q_desc, db_desc, tmp, args.reps)
        if "q_chunk" in args.only:
            rows += bench_q_chunk(args.reps)
        if "jpeg" in args.only:
            rows += bench_jpeg(root, tmp, args.reps)
        if "pitts" in args.only:
            split, q_desc, db_desc = pitts_size_split()
            rows += bench_mining("Pitts30k size", split, q_desc, db_desc, 10_000, False, args.reps,
                                 ["mining", "radix"])  # fmt: skip
    if args.out:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
