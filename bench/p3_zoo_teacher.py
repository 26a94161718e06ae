#!/usr/bin/env python
"""P3 (published teacher): cost of a WAKD step under a DINOv2-B teacher, with and without the cache.

    p3_zoo_teacher_cache_ratio  = WAKD step with the teacher cache / plain student step (goal <= 1.2)
    p3_zoo_teacher_live_ratio   = WAKD step with the live teacher / plain student step

At the demo size: the demo's student (MobileNetV3-L cut at stride 16, 1x1 -> 128, NetVLAD-32)
on one tuple of 8 images (query, hard positive, 3 negatives, 3 soft positives) at the city's
96x128, generation 0. Teacher: SALAD, DINOv2 ViT-B/14 (the published architecture, random
weights), seeing each image resized to its published 322x322 (23x23 patches), as
``train.py teacher=salad`` runs it. A step = ``PlaceModule.training_step`` + backward + SGD
step; the candidates are timed interleaved, round by round, on the same batch and threads,
and the medians of wall time compared (process CPU time reported as well: shared cores).
Filling the cache (one teacher forward per training image, once per fit) is reported per
image, not counted in the step. Writes p3_zoo_* keys into bench/results.json and the
<!-- p3_zoo --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import torch
from p1_speedup import THREADS, load_average
from p3_distill_step import step_seconds

from wakd.data.images import TensorImageDataset
from wakd.models import build_place_net
from wakd.modules.place_module import PlaceModule
from wakd.modules.teacher_cache import build_teacher_cache
from wakd.zoo import ZooTeacher, salad

IMAGE_SIZE = (96, 128)  # the synthetic city's
TEACHER_SIZE = (322, 322)  # SALAD's published evaluation size
TUPLE = 8
POS_NUM = 3
GOAL_RATIO = 1.2


def build_student() -> torch.nn.Module:
    """The demo's student (src/wakd/synth/demo.py STUDENT)."""
    return build_place_net("mobilenetv3_large", cut="stride16", proj_dim=128, num_clusters=32, bn_momentum=0.1)


def _module(teacher: ZooTeacher | None, cache: bool) -> PlaceModule:
    torch.manual_seed(0)  # the same student weights in every candidate
    optimizer = functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-3)
    module = PlaceModule(build_student(), optimizer, teacher=teacher, teacher_cache=cache, pos_num=POS_NUM)
    module.train()
    module.bench_optimizer = module.configure_optimizers()
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer receives training_step's logs
    torch.set_num_threads(THREADS)
    load_start = load_average()
    start_all = time.perf_counter()
    torch.manual_seed(1)
    teacher = ZooTeacher(salad.build().eval().requires_grad_(False), TEACHER_SIZE)
    images = torch.rand(1, TUPLE, 3, *IMAGE_SIZE)
    batch = (images, torch.arange(TUPLE)[None])

    candidates = {
        "plain": _module(None, cache=False),
        "wakd_cache": _module(teacher, cache=True),
        "wakd_live": _module(teacher, cache=False),
    }
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, TensorImageDataset(images[0]), IMAGE_SIZE, batch_size=TUPLE, num_workers=0,
                                progress=False)
    fill_per_image = (time.perf_counter() - start) / TUPLE
    candidates["wakd_cache"].teacher_cache = cache

    times, cpu_times = step_seconds(candidates, batch, args.rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    ratio, ratio_live = median["wakd_cache"] / median["plain"], median["wakd_live"] / median["plain"]
    ratio_cpu = median_cpu["wakd_cache"] / median_cpu["plain"]
    ratio_live_cpu = median_cpu["wakd_live"] / median_cpu["plain"]
    total = time.perf_counter() - start_all
    per_image_bytes = cache.table.shape[1] * cache.table.element_size()
    h, w = cache.map_size
    print("median step s: " + ", ".join(f"{k} {v:.3f}" for k, v in median.items()))
    print(f"WAKD / plain: {ratio:.2f}x with the cache, {ratio_live:.2f}x live (CPU time {ratio_cpu:.2f}x, "
          f"{ratio_live_cpu:.2f}x); cache fill {fill_per_image:.2f} s/image, {per_image_bytes} B/image; total {total:.0f} s")
    if args.no_write:
        return

    from _results import machine, merge_results, replace_section

    merge_results(
        {
            "p3_zoo_teacher_cache_ratio": round(ratio, 3),
            "p3_zoo_teacher_live_ratio": round(ratio_live, 3),
            "p3_zoo_teacher_cache_ratio_cpu_time": round(ratio_cpu, 3),
            "p3_zoo_teacher_live_ratio_cpu_time": round(ratio_live_cpu, 3),
            "p3_zoo_plain_step_seconds": round(median["plain"], 4),
            "p3_zoo_teacher_cache_step_seconds": round(median["wakd_cache"], 4),
            "p3_zoo_teacher_live_step_seconds": round(median["wakd_live"], 4),
            "p3_zoo_teacher_cache_fill_seconds_per_image": round(fill_per_image, 4),
            "p3_zoo_teacher_cache_bytes_per_image": per_image_bytes,
        }
    )
    rows = "\n".join(
        f"| {label} | {median[key]:.3f} | {median[key] / median['plain']:.2f} | "
        f"{median_cpu[key]:.3f} | {median_cpu[key] / median_cpu['plain']:.2f} | "
        f"{' '.join(f'{t:.2f}' for t in times[key])} |"
        for key, label in (
            ("plain", "plain student (hard loss only)"),
            ("wakd_cache", "WAKD from SALAD, teacher cache"),
            ("wakd_live", "WAKD from SALAD, live teacher"),
        )
    )
    met = "met" if ratio <= GOAL_RATIO else "NOT met"
    replace_section(
        "p3_zoo",
        f"""
## P3, published teacher: a WAKD step under DINOv2-B SALAD (`bench/p3_zoo_teacher.py`)

Machine: {machine()}; {THREADS} threads; load average {load_start} at the start (shared
cores: compare the ratios, measured interleaved in one process). The demo's student
(MobileNetV3-L stride 16, 1x1 -> 128, NetVLAD-32) on one tuple of {TUPLE} images at
{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, generation 0; teacher SALAD (DINOv2 ViT-B/14, random weights)
at {TEACHER_SIZE[0]}x{TEACHER_SIZE[1]}; step = `PlaceModule.training_step` + backward + SGD
step. Median of {args.rounds} rounds after a warm-up; {total:.0f} s in all.

| step | median wall s | / plain | median CPU s | / plain | wall s per round |
|---|---:|---:|---:|---:|---|
{rows}

**p3_zoo_teacher_cache_ratio = {ratio:.2f}x** with the teacher cache (goal <= {GOAL_RATIO}x:
{met}); {ratio_live:.2f}x with the live teacher (CPU time: {ratio_cpu:.2f}x and
{ratio_live_cpu:.2f}x). Filling the cache costs one teacher forward per training image per
fit ({fill_per_image:.2f} s per image here) and holds {per_image_bytes:,} bytes of fp16 targets per
image: the 8,448-d descriptor and the {h}x{w} transport map. Pitts30k-train's 17,416 images:
{per_image_bytes * 17416 / 2**20:.0f} MiB per process (BoQ-DINOv2: 12,288 + 529 values, 25,634
bytes per image).
""",
    )


if __name__ == "__main__":
    main()
