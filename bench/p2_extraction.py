#!/usr/bin/env python
"""P2 benchmark: efficiency of descriptor extraction from JPEG files.

    p2_extraction_efficiency = images/s of ``extract_descriptors`` over an
        ``ImageListDataset`` of JPEG files (decode, resize, batch, forward, store)
        / images/s of the bare forward on the same images, pre-decoded into batches.

The network is the student (MobileNetV3-L + 1x1 960->512 + NetVLAD-64, random weights,
k-means NetVLAD) on the default inference path (``optimize_for_inference``), batch 8,
2 threads. Two cases: "demo", 1,000 synthetic-city JPEGs at their 96x128 size, and
"480x640" (the headline figure), 200 of them upscaled to 480x640 JPEGs, described
at 480x640. Extraction runs with 2 DataLoader workers (the project default), and
for the 480x640 case also with 1 and 0 to show where time goes. Goal >= 0.90.
Writes p2_* keys into bench/results.json and the <!-- p2 --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from p1_speedup import THREADS, build_student, init_netvlad, load_average
from PIL import Image
from torch import nn

from wakd.data.images import ImageListDataset, build_transform
from wakd.eval.extract import extract_descriptors
from wakd.models.inference import optimize_for_inference

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = REPO / "datasets" / "data" / "synthcity" / "raw" / "images"
DEMO_COUNT = 1000  # small images: enough to amortise DataLoader start-up
LARGE_COUNT = 200
BATCH = 8
GOAL = 0.90


def demo_jpegs(workdir: Path) -> list[Path]:
    """The first ``DEMO_COUNT`` database JPEGs of the demo city (generated if absent)."""
    root = DEMO_IMAGES
    if not root.is_dir():
        subprocess.run(
            [sys.executable, "-m", "wakd.data.synthcity", "--out", str(workdir), "--preset", "demo",
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
    """Seconds to describe pre-decoded batches (descriptors kept, as extraction does)."""
    start = time.perf_counter()
    with torch.no_grad():
        kept = [net(batch).to(torch.float16) for batch in batches]
    del kept
    return time.perf_counter() - start


def extraction(net: nn.Module, dataset: ImageListDataset, workers: int) -> float:
    """Wall seconds of one full ``extract_descriptors`` call (worker start-up included)."""
    start = time.perf_counter()
    extract_descriptors(net, dataset, batch_size=BATCH, num_workers=workers, progress=False)
    return time.perf_counter() - start


def measure(
    net: nn.Module, dataset: ImageListDataset, workers: tuple[int, ...], rounds: int
) -> dict[str, float]:
    """Median images/s of the bare forward and of extraction per worker count, interleaved."""
    items = [dataset[i][0] for i in range(len(dataset))]
    batches = [torch.stack(items[i : i + BATCH]) for i in range(0, len(items), BATCH)]
    bare_forward(net, batches[:2])  # warm-up
    times: dict[str, list[float]] = {"forward": [], **{f"workers={w}": [] for w in workers}}
    for _ in range(rounds):
        times["forward"].append(bare_forward(net, batches))
        for w in workers:
            times[f"workers={w}"].append(extraction(net, dataset, w))
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
        for case, paths, size, workers in (
            ("demo", demo, (96, 128), (2,)),
            ("480x640", large, (480, 640), (2, 1, 0)),
        ):
            init_netvlad(student, torch.randn(9, 3, *size))
            net = optimize_for_inference(student, torch.randn(1, 3, *size))
            dataset = ImageListDataset(paths, build_transform(size, train=False))
            results[case] = measure(net, dataset, workers, args.rounds)
            print(case, {k: round(v, 2) for k, v in results[case].items()})
    efficiency = {case: r["workers=2"] / r["forward"] for case, r in results.items()}
    print("efficiency (2 workers):", {k: round(v, 3) for k, v in efficiency.items()})
    if args.no_write:
        return

    from _results import machine, merge_results, replace_section

    merge_results(
        {
            "p2_extraction_efficiency": round(efficiency["480x640"], 3),
            "p2_extraction_efficiency_demo": round(efficiency["demo"], 3),
            "p2_forward_images_per_second": round(results["480x640"]["forward"], 2),
            "p2_extraction_images_per_second": round(results["480x640"]["workers=2"], 2),
        }
    )
    rows = "\n".join(
        f"| {case} | {name} | {speed:.2f} | {speed / r['forward']:.2f} |"
        for case, r in results.items()
        for name, speed in r.items()
    )
    met = "met" if efficiency["480x640"] >= GOAL else "NOT met"
    replace_section(
        "p2",
        f"""
## P2: extraction efficiency (`bench/p2_extraction.py`)

Machine: {machine()}; {THREADS} threads; load average {load_start} at the start
(shared cores: compare the ratios, measured interleaved in one process). Student
(MobileNetV3-L + NetVLAD-64, random weights) on the default inference path, batch
{BATCH}; {DEMO_COUNT} demo JPEGs at 96x128, {LARGE_COUNT} of them upscaled to 480x640.
"forward" = the bare network on pre-decoded batches; "workers=N" = `extract_descriptors`
over an `ImageListDataset` (decode, resize, batch, forward, store), wall time including
DataLoader start-up. Median of {args.rounds} rounds.

| case | path | img/s | / forward |
|---|---|---:|---:|
{rows}

**p2_extraction_efficiency = {efficiency["480x640"]:.2f}** (480x640, 2 workers; goal >= {GOAL}:
{met}); demo case {efficiency["demo"]:.2f}.
""",
    )


if __name__ == "__main__":
    main()
