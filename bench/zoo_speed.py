#!/usr/bin/env python
"""Zoo speed: wakd's CPU descriptor path for published models against their authors' eager forward.

For BoQ-ResNet50 (384 x 384) and SALAD-DINOv2 (322 x 322): the authors' model is built
from their code (snapshots outside the project, as in ``bench/zoo_parity_vit.py``), given
random weights and saved in its published format; wakd loads that file with
``wakd.zoo.load``, folds BatchNorm, exports ONNX at the evaluation size and runs it with
ONNX Runtime (``OnnxDescriptorNet``, the ``eval.py backend=onnxruntime`` path). Both
describe the same seeded images, interleaved in one process on the same threads; the
figure is images per second, median of the repetitions after a warm-up.
Goal: >= 1.5x with descriptors within 1e-4.

    PYTHONPATH=src .venv/bin/python bench/zoo_speed.py --ext DIR [--images 4] [--rounds 5]

Writes ``zoo_speedup: {family: ratio}`` (and the error) into bench/results.json and the
<!-- zoo_speed --> section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load_average, machine, merge_results, replace_section
from zoo_parity_vit import REPOS, authors_boq, authors_salad, commit, perturb, save_published

from wakd import zoo
from wakd.models.inference import OnnxDescriptorNet, export_onnx, fold_batchnorm

THREADS = 2
CASES = {  # key: (the authors' model, evaluation size)
    "boq": (lambda ext: authors_boq(ext, "resnet50"), (384, 384)),
    "salad": (authors_salad, (322, 322)),
}


def seconds(fn, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(images)
    return time.perf_counter() - start


def measure(ext: Path, key: str, n_images: int, rounds: int, tmp: Path) -> dict:
    make, (height, width) = CASES[key]
    authors, file = make(ext)
    perturb(authors, seed=0)
    authors.eval()
    save_published(authors, tmp / file)
    model = zoo.load(tmp / file)
    images = torch.rand(n_images, 3, height, width, generator=torch.Generator().manual_seed(0))
    export_onnx(fold_batchnorm(model), images[:1], tmp / f"{key}.onnx")
    ours = OnnxDescriptorNet(tmp / f"{key}.onnx", threads=THREADS)
    with torch.no_grad():
        error = (ours(images) - authors(images)).abs().max().item()
    times: dict[str, list[float]] = {"authors": [], "wakd": []}
    for round_ in range(rounds + 1):
        for name, fn in (("authors", authors), ("wakd", ours)):
            elapsed = seconds(fn, images)
            if round_ > 0:  # round 0 warms up caches and allocators
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model.zoo_description,
        "size": f"{height}x{width}",
        "authors_images_per_second": n_images / medians["authors"],
        "wakd_images_per_second": n_images / medians["wakd"],
        "speedup": medians["authors"] / medians["wakd"],
        "max_abs_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ext", type=Path, default=os.environ.get("WAKD_EXT"), required="WAKD_EXT" not in os.environ,
        help="the folder holding the authors' snapshots (default: $WAKD_EXT)",
    )
    parser.add_argument("--images", type=int, default=4, help="images per timed batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions after a warm-up")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/results.*")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="wakd-zoo-speed-") as tmp:
        results = {key: measure(args.ext, key, args.images, args.rounds, Path(tmp)) for key in CASES}
    load = f"{load_before} -> {load_average()}"
    for key, r in results.items():
        print(f"{key}: {r['speedup']:.2f}x ({r['wakd_images_per_second']:.2f} vs "
              f"{r['authors_images_per_second']:.2f} img/s), max |diff| {r['max_abs_error']:.1e}")
    if args.no_write:
        return
    merge_results({
        "zoo_speedup": {key: round(r["speedup"], 2) for key, r in results.items()},
        "zoo_speed_max_abs_error": {key: r["max_abs_error"] for key, r in results.items()},
    }, load=load)
    commits = ", ".join(f"{repo} `{commit(args.ext / folder)[:8]}`" for repo, folder in REPOS.items())
    rows = "\n".join(
        f"| {r['model']} | {r['size']} | {r['authors_images_per_second']:.2f} | "
        f"{r['wakd_images_per_second']:.2f} | **{r['speedup']:.2f}x** | {r['max_abs_error']:.1e} |"
        for r in results.values()
    )
    replace_section("zoo_speed", f"""
## Zoo speed: wakd's ONNX Runtime path against the authors' eager forward (`bench/zoo_speed.py`)

{machine()}; load average {load}. {args.images} seeded random images a batch, {THREADS}
threads for both, interleaved, median of {args.rounds} after a warm-up. The authors' models
from their code ({commits}) with random weights, saved in the published format and loaded
by `wakd.zoo.load`; wakd runs the BN-folded ONNX export with ONNX Runtime. Goal >= 1.5x,
descriptors within 1e-4.

| model | input | authors img/s | wakd img/s | speed-up | max abs diff |
|---|---|---:|---:|---:|---:|
{rows}
""")


if __name__ == "__main__":
    main()
