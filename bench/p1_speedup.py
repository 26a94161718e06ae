#!/usr/bin/env python
"""P1 benchmark: student over teacher descriptor speed on the CPU inference path.

Student: MobileNetV3-L + 1x1 conv 960->512 + BN + hardswish + NetVLAD-64. Teacher:
VGG16 conv5_3 + NetVLAD-64. Both at 480x640, batch 8, the same number of threads
(2), both on the project's default inference path (``optimize_for_inference``), whose
descriptors are checked against eager fp32 (max abs difference <= 1e-4). Random
weights (no ImageNet on these machines), but NetVLAD initialised from k-means of the
backbone's dense features of random images, so soft assignments are not degenerate.
The candidates are timed interleaved, round by round, and the medians compared.

    p1_student_teacher_speedup = student img/s / teacher img/s (goal >= 45)
    p1_student_vs_eager        = student img/s / student eager fp32 img/s

Writes p1_* keys into bench/results.json and the <!-- p1 --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from wakd.models import PlaceNet, build_place_net, kmeans_centroids, sample_local_features
from wakd.models.inference import optimize_for_inference

IMAGE_SIZE = (480, 640)
BATCH = 8
THREADS = 2
GOAL_SPEEDUP = 45.0
TOLERANCE = 1e-4


def build_student() -> PlaceNet:
    """The paper's student: MobileNetV3-L (stride 32) + 1x1 960->512 + NetVLAD-64."""
    return build_place_net("mobilenetv3_large", cut="full", proj_dim=512, num_clusters=64)


def build_teacher() -> PlaceNet:
    """The paper's teacher: VGG16 conv5_3 (before ReLU) + NetVLAD-64."""
    return build_place_net("vgg16", num_clusters=64)


@torch.no_grad()
def init_netvlad(net: PlaceNet, images: Tensor, seed: int = 0) -> PlaceNet:
    """k-means NetVLAD initialisation from the dense features of ``images``.

    Cluster other images than the measured ones: a feature that *is* a centroid, alone in
    its cluster, leaves a zero residual whose intra-normalisation turns rounding noise
    into O(1) descriptor entries (no 1e-4 check can pass on such an image).
    """
    features = sample_local_features(
        net.backbone, [images], per_image=900, seed=seed, progress=False
    )
    centroids = kmeans_centroids(features, net.pool.num_clusters, seed=seed, niter=20)
    net.pool.init_from_centroids(torch.from_numpy(centroids), torch.from_numpy(features))
    return net.eval()


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_start = load_average()
    images = torch.randn(BATCH, 3, *IMAGE_SIZE)
    # 2,700 features each (faiss wants >= 39 per centroid): 9 x 300 and 3 x 900 locations.
    student = init_netvlad(build_student(), torch.randn(9, 3, *IMAGE_SIZE))
    teacher = init_netvlad(build_teacher(), torch.randn(3, 3, *IMAGE_SIZE))
    prepare = {}
    start = time.perf_counter()
    fast_student = optimize_for_inference(student, images[:1])
    prepare["student"] = time.perf_counter() - start
    start = time.perf_counter()
    fast_teacher = optimize_for_inference(teacher, images[:1])
    prepare["teacher"] = time.perf_counter() - start

    with torch.no_grad():
        # The check: the whole timed batch for the student, two images for the slow teacher.
        error_student = (fast_student(images) - student(images)).abs().max().item()
        error_teacher = (fast_teacher(images[:2]) - teacher(images[:2])).abs().max().item()
        candidates: dict[str, nn.Module] = {
            "student": fast_student,
            "student_eager": student,
            "teacher": fast_teacher,
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for round_ in range(args.rounds + 1):
            for name, net in candidates.items():
                elapsed = seconds(lambda net=net: net(images))
                if round_ > 0:  # round 0 warms up caches and allocators
                    times[name].append(elapsed)
    speed = {name: BATCH / statistics.median(t) for name, t in times.items()}
    speedup = speed["student"] / speed["teacher"]
    vs_eager = speed["student"] / speed["student_eager"]
    error = max(error_student, error_teacher)
    path = type(fast_student).__name__
    print(f"path {path}; img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in speed.items()))
    print(f"student/teacher {speedup:.1f}x, student vs eager {vs_eager:.2f}x, max err {error:.1e}")
    if error > TOLERANCE:
        raise SystemExit(f"descriptors differ from eager fp32 by {error:.1e} > {TOLERANCE}")
    if args.no_write:
        return

    from _results import machine, merge_results, replace_section

    merge_results(
        {
            "p1_student_teacher_speedup": round(speedup, 2),
            "p1_student_vs_eager": round(vs_eager, 2),
            "p1_student_images_per_second": round(speed["student"], 2),
            "p1_teacher_images_per_second": round(speed["teacher"], 3),
            "p1_student_eager_images_per_second": round(speed["student_eager"], 2),
            "p1_max_abs_error": float(f"{error:.2e}"),
        },
        load=f"{load_start} at the start",
    )
    rows = "\n".join(
        f"| {label} | {speed[key]:.2f} | {' '.join(f'{BATCH / t:.2f}' for t in times[key])} |"
        for key, label in (
            ("student", f"student, default path ({path})"),
            ("teacher", f"teacher, default path ({type(fast_teacher).__name__})"),
            ("student_eager", "student, eager fp32"),
        )
    )
    met = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
    replace_section(
        "p1",
        f"""
## P1: student vs teacher descriptor speed (`bench/p1_speedup.py`)

Machine: {machine()}; {THREADS} threads; load average {load_start} at the start (the
cores are shared, so absolute speeds are noisy: the candidates run interleaved in one
process and only ratios are meant to be compared). 480x640, batch {BATCH}, random
weights, NetVLAD-64 from k-means of dense features. Default inference path =
`optimize_for_inference` (BatchNorm folded, ONNX Runtime on the CPU, each thread describing
its share of the batch); preparation took
{prepare["student"]:.1f} s (student) and {prepare["teacher"]:.1f} s (teacher). Median of
{args.rounds} rounds after a warm-up.

| network | img/s (median) | img/s per round |
|---|---:|---|
{rows}

**p1_student_teacher_speedup = {speedup:.1f}x** (goal >= {GOAL_SPEEDUP:.0f}x: {met});
p1_student_vs_eager = {vs_eager:.2f}x. Max abs difference to eager fp32:
{error:.1e} (student on all {BATCH} images, teacher on 2).
""",
    )


if __name__ == "__main__":
    main()
