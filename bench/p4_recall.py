#!/usr/bin/env python
"""P4 benchmark: Recall@1/5/10/20 at Pitts250k-test size on random descriptors.

83,952 database x 8,280 query x 4,096-d fp16 unit descriptors. Measures the wall
time of search + recall and the peak RSS (VmHWM of a fresh child process per run,
so runs never mix) divided by the bytes of the fp16 descriptor matrices, for

* chunked: wakd.knn.knn_search (faiss, fp16 -> fp32 per chunk, top-k merge)
  followed by wakd.eval.recall.recall_at_n, at full size;
* reference: full fp32 distance matrix + full argsort, at fractions of the
  database it survives, extrapolated affinely in N to the full size.

Goal: <= 24 s and peak RSS <= 2x the fp16 descriptors. Writes p4_* keys into
bench/results.json and the <!-- p4 --> section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_DB, NUM_Q, DIM, K = 83_952, 8_280, 4_096, 20
IMAGES_PER_PLACE = 24  # Pitts250k: 2 pitches x 12 yaws per database place
RADIUS_M = 25.0
NS = (1, 5, 10, 20)
GOAL_SECONDS, GOAL_RSS_RATIO = 24.0, 2.0


# --------------------------------------------------------------------------- data


def make_data(out: Path, seed: int, gen_chunk: int = 8192) -> None:
    """Write db.npy / q.npy (fp16, unit rows) and positives.npz (CSR) into ``out``.

    Geometry: database places scattered so a 25 m disc holds ~2-3 places (~50-70
    images); each query lies ~8 m (per axis) from one place and its descriptor is
    a noisy copy of one image there, noise spanning easy to hopeless.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    num_places = -(-NUM_DB // IMAGES_PER_PLACE)
    side = np.sqrt(num_places * np.pi * RADIUS_M**2 / 2.5)  # metres
    places = rng.uniform(0, side, size=(num_places, 2))
    db_utm = np.repeat(places, IMAGES_PER_PLACE, axis=0)[:NUM_DB]  # [N,2]
    anchors = np.sort(rng.integers(0, NUM_DB, NUM_Q))  # [Q]
    q_utm = db_utm[anchors] + rng.normal(0, 8, size=(NUM_Q, 2))  # [Q,2]
    pos_lists = cKDTree(db_utm).query_ball_point(q_utm, r=RADIUS_M)
    lengths = np.array([len(p) for p in pos_lists])
    np.savez(out / "positives.npz", offsets=np.concatenate([[0], np.cumsum(lengths)]),
             indices=np.concatenate([np.sort(p) for p in pos_lists]).astype(np.int64))

    db = np.lib.format.open_memmap(out / "db.npy", "w+", np.float16, (NUM_DB, DIM))
    q = np.lib.format.open_memmap(out / "q.npy", "w+", np.float16, (NUM_Q, DIM))
    noise = rng.uniform(0.5, 20.0, size=NUM_Q).astype(np.float32)  # |noise| / |signal|
    for a in range(0, NUM_DB, gen_chunk):
        x = rng.standard_normal((min(gen_chunk, NUM_DB - a), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        db[a : a + x.shape[0]] = x
        sel = np.flatnonzero((anchors >= a) & (anchors < a + x.shape[0]))  # queries anchored here
        y = rng.standard_normal((sel.size, DIM), dtype=np.float32)
        y *= (noise[sel] / np.linalg.norm(y, axis=1))[:, None]
        y += x[anchors[sel] - a]
        q[sel] = y / np.linalg.norm(y, axis=1, keepdims=True)
    db.flush()
    q.flush()
    print(f"data: side {side:.0f} m, positives/query median {np.median(lengths):.0f}, "
          f"without positives {np.mean(lengths == 0):.1%}", flush=True)


def _read_rows(path: Path, rows: int) -> np.ndarray:
    """First ``rows`` rows of a .npy into ordinary memory (no mapping left in RSS)."""
    mm = np.load(path, mmap_mode="r")
    shape, dtype, offset = (rows, *mm.shape[1:]), mm.dtype, mm.offset
    del mm
    return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def _peak_rss_bytes() -> int:
    """High-water RSS of this process's own address space (not inherited at spawn)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- child


def child(mode: str, data: Path, num_db: int) -> None:
    """One measured run; prints a JSON line with seconds, peak RSS and recall."""
    from wakd.eval.recall import recall_at_n
    from wakd.knn import knn_search

    db = _read_rows(data / "db.npy", num_db)  # [n,D] fp16
    q = _read_rows(data / "q.npy", NUM_Q)  # [Q,D] fp16
    csr = np.load(data / "positives.npz")
    offsets, pos_idx = csr["offsets"], csr["indices"]
    positives = [p[p < num_db] for p in np.split(pos_idx, offsets[1:-1])]

    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "chunked":
        _, topk = knn_search(db, q, K, use_gpu=False)  # [Q,K]
    else:
        q32, db32 = q.astype(np.float32), db.astype(np.float32)
        dist = q32 @ db32.T  # [Q,n] fp32, the whole matrix
        dist *= -2.0
        dist += (q32 * q32).sum(1)[:, None]
        dist += (db32 * db32).sum(1)[None, :]
        topk = np.argsort(dist, axis=1)[:, :K]  # full sort of every row
    recall = recall_at_n(topk, positives, NS)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss": _peak_rss_bytes(), "recall": recall,
                      "topk": topk.ravel().tolist() if num_db < NUM_DB else None}))


def run_child(mode: str, data: Path, num_db: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data),
                          "--num-db", str(num_db)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ratio"] = result["peak_rss"] / ((num_db + NUM_Q) * DIM * 2)
    print(f"  {mode:9s} N={num_db:6d}: {result['seconds']:6.1f} s "
          f"({result['cpu_seconds']:6.1f} CPU s), peak RSS "
          f"{result['peak_rss'] / 2**30:5.2f} GiB = {result['ratio']:.2f}x fp16, "
          f"R@1..20 {[round(100 * result['recall'][str(n)], 1) for n in NS]}", flush=True)
    return result


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    ap.add_argument("--ref-fractions", type=float, nargs=2, default=(0.05, 0.10))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    ap.add_argument("--child", choices=("chunked", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--num-db", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.num_db)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import machine, merge_results, replace_section

    data = Path(tempfile.mkdtemp(prefix="p4_recall_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        make_data(data, args.seed)
        load = os.getloadavg()[0]
        print(f"data generated in {time.perf_counter() - t0:.0f} s; load average {load:.1f}")
        chunked = [run_child("chunked", data, NUM_DB) for _ in range(args.runs)]
        sizes = [round(f * NUM_DB) for f in args.ref_fractions]
        ref = {n: [run_child("reference", data, n) for _ in range(args.runs)] for n in sizes}
        check = run_child("chunked", data, sizes[-1])
    finally:
        shutil.rmtree(data, ignore_errors=True)

    # Same database subset: the chunked search must give the reference's rankings.
    same_rows = np.mean(np.all(np.reshape(check["topk"], (NUM_Q, K))
                               == np.reshape(ref[sizes[-1]][0]["topk"], (NUM_Q, K)), axis=1))
    same_recall = check["recall"] == ref[sizes[-1]][0]["recall"]

    def extrapolate(key: str) -> float:
        (n0, n1), (y0, y1) = sizes, [median_of(ref[n], key) for n in sizes]
        return y0 + (y1 - y0) * (NUM_DB - n0) / (n1 - n0)

    seconds, ratio = median_of(chunked, "seconds"), median_of(chunked, "ratio")
    cpu_seconds = median_of(chunked, "cpu_seconds")
    ref_seconds, ref_rss = extrapolate("seconds"), extrapolate("peak_rss")
    ref_ratio = ref_rss / ((NUM_DB + NUM_Q) * DIM * 2)
    recall = chunked[0]["recall"]
    fp16_gib = (NUM_DB + NUM_Q) * DIM * 2 / 2**30
    results = {
        "p4_recall_seconds": round(seconds, 2),
        "p4_peak_rss_ratio": round(ratio, 3),
        "p4_recall_cpu_seconds": round(cpu_seconds, 1),
        "p4_reference_seconds_extrapolated": round(ref_seconds, 1),
        "p4_reference_peak_rss_ratio_extrapolated": round(ref_ratio, 2),
    }
    print(json.dumps(results, indent=2))
    print(f"check on N={sizes[-1]}: identical top-{K} rows {same_rows:.4%}, same recall {same_recall}")
    if args.no_write:
        return
    merge_results(results, load=f"{load:.1f} at the start")
    ref_lines = "\n".join(
        f"| reference, N = {n:,} ({100 * n / NUM_DB:.0f} %) | {median_of(ref[n], 'seconds'):.1f} | "
        f"{median_of(ref[n], 'cpu_seconds'):.1f} | "
        f"{median_of(ref[n], 'peak_rss') / 2**30:.2f} | {median_of(ref[n], 'ratio'):.2f} |"
        for n in sizes)
    replace_section("p4", f"""
## P4: Recall@N at Pitts250k-test size (`bench/p4_recall.py`)

Machine: {machine()}, load average {load:.1f} at the start
(the cores are shared with other jobs, so wall time is noisy; CPU s sums all threads). {NUM_DB:,} database x {NUM_Q:,} queries x {DIM:,}-d random unit
descriptors stored in fp16 ({fp16_gib:.2f} GiB), positives within {RADIUS_M:.0f} m of synthetic UTM
positions. Time = search + Recall@{{1,5,10,20}}, excluding loading; peak RSS = VmHWM of a
fresh process per run (loading included) divided by the fp16 descriptor bytes. Median of
{args.runs} runs. Goal: <= {GOAL_SECONDS:.0f} s and peak RSS <= {GOAL_RSS_RATIO:.0f}x descriptors.

| approach | wall s | CPU s | peak RSS (GiB) | RSS / fp16 descriptors |
|---|---:|---:|---:|---:|
| chunked faiss top-{K} (`knn_search` + `recall_at_n`), full size | {seconds:.1f} | {cpu_seconds:.1f} | {median_of(chunked, 'peak_rss') / 2**30:.2f} | {ratio:.2f} |
{ref_lines}
| reference extrapolated to N = {NUM_DB:,} | {ref_seconds:.0f} | | {ref_rss / 2**30:.1f} | {ref_ratio:.1f} |

Goal met: time {'yes' if seconds <= GOAL_SECONDS else 'NO'}, memory {'yes' if ratio <= GOAL_RSS_RATIO else 'NO'}.
Recall@1/5/10/20 of the synthetic set: {', '.join(f"{100 * recall[str(n)]:.1f}" for n in NS)} %.
Check against the reference on N = {sizes[-1]:,}: identical top-{K} rows {same_rows:.2%},
identical recall: {same_recall}. The reference is extrapolated affinely in N from its two sizes.
""")


if __name__ == "__main__":
    main()
