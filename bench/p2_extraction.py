#!/usr/bin/env python
"""P2 benchmark: efficiency of descriptor extraction from JPEG files.

    p2_extraction_efficiency = images/s of ``extract_descriptors`` over an
        ``ImageListDataset`` of JPEG files (decode, resize, batch, forward, store)
        / images/s of the bare forward on the same images, pre-decoded into batches.

The network is the student (MobileNetV3-L + 1x1 960->512 + NetVLAD-64, random weights,
k-means NetVLAD) on the default inference path (``optimize_for_inference``), batch 8,
2 threads. Two cases: "demo", 1,000 synthetic-city JPEGs at their 96x128 size, and
"480x640" (the headline figure), 200 of them upscaled to 480x640 JPEGs, described
at 480x640. The headline runs the project default: ``num_workers=2`` as configured,
which ``extract_descriptors`` caps on the CPU to the cores the forward leaves free
(``cpu_workers``: none on 2 cores with 2 threads, so the main process decodes), images
decoded to uint8 (torchvision decodes JPEGs already at the target size) and each batch converted to float in the main process (the net normalises it). For the 480x640 case further rows show where time goes:
the uint8 path with 1 and 2 workers (uncapped), and 2 workers that convert to float and
ship float32 images, as before the uint8 path. Goals: >= 0.95 at 480x640 and >= 0.90 on
the demo's 96x128 images (``p2_demo_efficiency``).
Writes p2_* keys into bench/results.json and the <!-- p2 --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from p1_speedup import THREADS, build_student, init_netvlad, load_average
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from wakd.data.images import ImageListDataset, build_transform, cpu_workers
from wakd.describe import extract_descriptors, torch_threads
from wakd.models.inference import OnnxDescriptorNet, optimize_for_inference

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = REPO / "datasets" / "data" / "synthcity" / "raw" / "images"
DEMO_COUNT = 1000  # small images: enough to amortise DataLoader start-up
LARGE_COUNT = 200
BATCH = 8
GOAL, GOAL_DEMO = 0.95, 0.90
DEFAULT_WORKERS = 2  # configs/eval.yaml and configs/datamodule/tuples.yaml


def demo_jpegs(workdir: Path) -> list[Path]:
    """The first ``DEMO_COUNT`` database JPEGs of the demo city (generated if absent)."""
    root = DEMO_IMAGES
    if not root.is_dir():
        subprocess.run(
            [sys.executable, "-m", "wakd.synth.synthcity", "--out", str(workdir), "--preset", "demo",
             "--quiet"],
            check=True,
        )  # fmt: skip
        root = workdir / "synthcity" / "raw" / "images"
    return sorted(root.rglob("*.jpg"))[:DEMO_COUNT]


def upscaled_jpegs(paths: list[Path], out: Path, size: tuple[int, int]) -> list[Path]:
    """Bicubic upscales of ``paths`` to ``size`` (H, W), saved as quality-90 JPEGs."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        target = out / f"{i:04d}.jpg"
        with Image.open(path) as image:
            image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC).save(target, quality=90)
        written.append(target)
    return written


def bare_forward(net: nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds to describe pre-decoded batches (descriptors kept in fp16, as extraction
    does, and PyTorch single-threaded around ONNX Runtime, as extraction runs it: with
    two PyTorch threads the fp16 conversion alone slowed the forward on busy cores)."""
    own_threads = isinstance(net, OnnxDescriptorNet)
    start = time.perf_counter()
    with torch.no_grad(), torch_threads(1) if own_threads else contextlib.nullcontext():
        kept = [net(batch).to(torch.float16) for batch in batches]
    del kept
    return time.perf_counter() - start


class FloatImages(Dataset):
    """The dataset behind an opaque wrapper: extraction cannot take its uint8 path, so the
    workers convert to float32 and ship float32 images, as before uint8 decoding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        return self.dataset[i]


def extraction(net: nn.Module, dataset: Dataset, workers: int, capped: bool = True) -> float:
    """Wall seconds of one full ``extract_descriptors`` call (worker start-up included);
    ``capped=False`` runs ``workers`` as given instead of ``cpu_workers(workers)``."""
    start = time.perf_counter()
    uncap = mock.patch("wakd.data.images.cpu_workers", side_effect=lambda n: n)
    with contextlib.nullcontext() if capped else uncap:
        extract_descriptors(net, dataset, batch_size=BATCH, num_workers=workers, progress=False)
    return time.perf_counter() - start


def variants(dataset: ImageListDataset, full: bool) -> dict[str, Callable[[nn.Module], float]]:
    """Row name -> timed extraction; the first is the project default (the headline)."""
    used = cpu_workers(DEFAULT_WORKERS)
    rows: dict[str, Callable[[nn.Module], float]] = {
        f"default: uint8, workers={DEFAULT_WORKERS} (runs {used})": lambda net: extraction(
            net, dataset, DEFAULT_WORKERS
        )
    }
    if full:
        for workers in (1, 2):
            rows[f"uint8, workers={workers} uncapped"] = lambda net, w=workers: extraction(
                net, dataset, w, capped=False
            )
        rows["float32 from workers, workers=2 uncapped"] = lambda net: extraction(
            net, FloatImages(dataset), 2, capped=False
        )
    return rows


def measure(net: nn.Module, dataset: ImageListDataset, full: bool, rounds: int) -> dict[str, float]:
    """Median images/s of the bare forward and of each extraction variant, interleaved."""
    items = [dataset[i][0] for i in range(len(dataset))]
    batches = [torch.stack(items[i : i + BATCH]) for i in range(0, len(items), BATCH)]
    bare_forward(net, batches[:2])  # warm-up
    rows = variants(dataset, full)
    times: dict[str, list[float]] = {"forward": [], **{name: [] for name in rows}}
    for _ in range(rounds):
        times["forward"].append(bare_forward(net, batches))
        for name, run in rows.items():
            times[name].append(run(net))
    return {k: len(dataset) / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_start = load_average()
    student = build_student()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="wakd-p2-") as tmp:
        demo = demo_jpegs(Path(tmp))
        large = upscaled_jpegs(demo[:LARGE_COUNT], Path(tmp) / "large", (480, 640))
        for case, paths, size, full in (
            ("demo", demo, (96, 128), False),
            ("480x640", large, (480, 640), True),
        ):
            init_netvlad(student, torch.randn(9, 3, *size))
            net = optimize_for_inference(student, torch.randn(1, 3, *size))
            dataset = ImageListDataset(paths, build_transform(size, train=False))
            results[case] = measure(net, dataset, full, args.rounds)
            print(case, {k: round(v, 2) for k, v in results[case].items()})
    headline = next(k for k in results["480x640"] if k.startswith("default"))
    efficiency = {case: r[headline] / r["forward"] for case, r in results.items()}
    print("efficiency (default):", {k: round(v, 3) for k, v in efficiency.items()})
    load_end = load_average()
    if args.no_write:
        return

    from _results import machine, merge_results, replace_section

    merge_results(
        {
            "p2_extraction_efficiency": round(efficiency["480x640"], 3),
            "p2_demo_efficiency": round(efficiency["demo"], 3),
            "p2_forward_images_per_second": round(results["480x640"]["forward"], 2),
            "p2_extraction_images_per_second": round(results["480x640"][headline], 2),
        },
        load=f"{load_start} -> {load_end}",
    )
    rows = "\n".join(
        f"| {case} | {name} | {speed:.2f} | {speed / r['forward']:.2f} |"
        for case, r in results.items()
        for name, speed in r.items()
    )
    met = "met" if efficiency["480x640"] >= GOAL else "NOT met"
    met_demo = "met" if efficiency["demo"] >= GOAL_DEMO else "NOT met"
    replace_section(
        "p2",
        f"""
## P2: extraction efficiency (`bench/p2_extraction.py`)

Machine: {machine()}; {THREADS} threads; load average {load_start} at the start, {load_end}
at the end (shared cores: compare the ratios, measured interleaved in one process). Student
(MobileNetV3-L + NetVLAD-64, random weights) on the default inference path, batch
{BATCH}; {DEMO_COUNT} demo JPEGs at 96x128, {LARGE_COUNT} of them upscaled to 480x640.
"forward" = the bare network on pre-decoded batches; the other rows = `extract_descriptors`
over an `ImageListDataset` (decode, resize, batch, forward, store), wall time including
DataLoader start-up. "default": `num_workers={DEFAULT_WORKERS}` as configured, capped on the
CPU to the cores the forward leaves free (none here: the main process decodes); images are
decoded to uint8 (JPEGs stored at the target size by torchvision's decoder, straight into a tensor) and each batch is converted to float in the main process. "uncapped": the worker count as given. "float32 from
workers": the workers convert to float and ship float32 images, as before the uint8 path (the
forward itself is today's in every row). Median of {args.rounds} rounds.

| case | path | img/s | / forward |
|---|---|---:|---:|
{rows}

**p2_extraction_efficiency = {efficiency["480x640"]:.2f}** (480x640, default path; goal >= {GOAL}:
{met}); **p2_demo_efficiency = {efficiency["demo"]:.2f}** (96x128; goal >= {GOAL_DEMO}: {met_demo}).
""",
    )


if __name__ == "__main__":
    main()
