#!/usr/bin/env python
"""Parity of the ViT-era zoo families (SALAD, BoQ, MegaLoc) with their authors' code.

The authors' repositories are checked out OUTSIDE the project and their model files are
imported by path at run time (none of their code is copied here):

    EXT/salad            serizba/salad                 models/backbones/dinov2.py, models/aggregators/salad.py
    EXT/Bag-of-Queries   amaralibey/Bag-of-Queries     src/backbones.py, src/boq.py (hubconf's VPRModel layout)
    EXT/MegaLoc          gmberton/MegaLoc              megaloc_model.py
    EXT/dinov2           facebookresearch/dinov2       the hub models SALAD and BoQ load

SALAD's and BoQ's ``torch.hub.load('facebookresearch/dinov2', name)`` is redirected, while
their models are built, to the local dinov2 checkout with ``pretrained=False`` (nothing is
downloaded). Each authors' model gets random weights (every parameter perturbed, so no
LayerScale of 1 or zero bias hides a mistake), is saved in its published file format
(SALAD ``dino_salad.ckpt`` and BoQ ``<backbone>_<dim>.pth``: torch.save of the model's state
dict; MegaLoc ``model.safetensors``), and the file is read back into the wakd family through
``detect`` + ``build`` + ``load_state_dict(strict=True)``. Both compute descriptors of the
same random images (the authors' models get ImageNet-normalised images, as their data
pipelines deliver; wakd's normalise inside) at each family's evaluation size and at a
non-square size; the figure is the max |difference| over all of them, fp32, CPU.

    PYTHONPATH=src .venv/bin/python bench/zoo_parity_vit.py [--ext /work/ext] [--families salad,boq,megaloc]

Prints {family_variant: max_abs_error} as JSON and writes bench/zoo_parity_vit.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from wakd.atomic import atomic_write_json
from wakd.models.normalization import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "zoo_parity_vit.json"


def import_file(path: Path, alias: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def local_dinov2(dinov2_dir: Path) -> Iterator[None]:
    """Redirect ``torch.hub.load('facebookresearch/dinov2', name)`` to the local checkout,
    random weights."""
    real_load = torch.hub.load

    def load(repo: str, name: str, *args, **kwargs):
        if repo != "facebookresearch/dinov2":
            raise RuntimeError(f"unexpected torch.hub.load({repo!r})")
        return real_load(str(dinov2_dir), name, source="local", pretrained=False)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = real_load


def perturb(model: nn.Module, seed: int) -> None:
    """Random weights; BatchNorm statistics measured on random images (default ones make a
    random ResNet's output nearly image-independent, which would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative average over the calibration batch
            model.train()
            model(torch.rand(4, 3, 224, 224, generator=generator))
            model.eval()


def commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


class Authors(nn.Module):
    """The authors' backbone + aggregator under the names their checkpoints use; images are
    ImageNet-normalised here, as their data pipelines do before the model."""

    def __init__(
        self, backbone: nn.Module, aggregator: nn.Module, head: Callable[[object], torch.Tensor]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        self.head = head
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.aggregator(self.backbone((images - self.mean) / self.std)))


def authors_salad(ext: Path) -> tuple[nn.Module, str]:
    backbones = import_file(ext / "salad/models/backbones/dinov2.py", "authors_salad_dinov2")
    aggregators = import_file(ext / "salad/models/aggregators/salad.py", "authors_salad_aggregator")
    # hubconf.dinov2_salad's arguments
    with local_dinov2(ext / "dinov2"):
        backbone = backbones.DINOv2(
            "dinov2_vitb14", num_trainable_blocks=4, return_token=True, norm_layer=True
        )
    aggregator = aggregators.SALAD(
        num_channels=768, num_clusters=64, cluster_dim=128, token_dim=256
    )
    return Authors(backbone, aggregator, lambda out: out), "dino_salad.ckpt"


def authors_boq(ext: Path, backbone_name: str) -> tuple[nn.Module, str]:
    backbones = import_file(ext / "Bag-of-Queries/src/backbones.py", "authors_boq_backbones")
    boq = import_file(ext / "Bag-of-Queries/src/boq.py", "authors_boq")
    # hubconf.get_trained_boq's arguments
    if backbone_name == "dinov2":
        with local_dinov2(ext / "dinov2"):
            backbone = backbones.DinoV2()
        aggregator = boq.BoQ(
            backbone.out_channels, proj_channels=384, num_queries=64, num_layers=2, row_dim=32
        )
        file = "dinov2_12288.pth"
    else:
        backbone = backbones.ResNet(backbone_name, pretrained=False, crop_last_block=True)
        aggregator = boq.BoQ(
            backbone.out_channels, proj_channels=512, num_queries=64, num_layers=2, row_dim=32
        )
        file = f"{backbone_name}_16384.pth"
    return Authors(backbone, aggregator, lambda out: out[0]), file


def authors_megaloc(ext: Path) -> tuple[nn.Module, str]:
    megaloc = import_file(ext / "MegaLoc/megaloc_model.py", "authors_megaloc")
    model = megaloc.MegaLoc()
    return Authors(nn.Identity(), model, lambda out: out), "model.safetensors"


def save_published(model: nn.Module, path: Path) -> None:
    # MegaLoc's whole model sits in Authors.aggregator: its file has MegaLoc's own key names.
    state = {
        k.removeprefix("aggregator.") if path.suffix == ".safetensors" else k: v
        for k, v in model.state_dict().items()
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def load_published(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def compare(
    family: ModuleType, authors: nn.Module, file: str, sizes: list[tuple[int, int]], seed: int
) -> dict:
    perturb(authors, seed)
    authors.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file
        save_published(authors, path)
        state = load_published(path)
    options = family.detect(state)
    if options is None:
        raise SystemExit(f"{family.NAME}: detect() did not recognise the authors' {file}")
    ours = family.build(**options).eval()
    ours.load_state_dict(state, strict=True)
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    with torch.no_grad():
        for height, width in sizes:
            images = torch.rand(2, 3, height, width, generator=generator)
            expected, got = authors(images), ours(images)
            cosine = torch.nn.functional.cosine_similarity(expected, got, dim=1).min().item()
            errors[f"{height}x{width}"] = {
                "max_abs_error": (expected - got).abs().max().item(),
                "min_cosine": cosine,
                "dim": int(got.shape[1]),
                # a degenerate random model would give both images the same descriptor
                "cosine_between_images": torch.nn.functional.cosine_similarity(
                    got[:1], got[1:]
                ).item(),
            }
    return {"describe": family.describe(options), "options": options, "sizes": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ext", type=Path, default=Path("/work/ext"))
    parser.add_argument("--families", default="salad,boq,megaloc")
    args = parser.parse_args()
    torch.manual_seed(0)
    wanted = args.families.split(",")
    runs: list[tuple[str, str, Callable[[], tuple[nn.Module, str]], list[tuple[int, int]]]] = []
    if "salad" in wanted:
        runs.append(("salad", "salad", lambda: authors_salad(args.ext), [(322, 322), (280, 420)]))
    if "boq" in wanted:
        runs.append(
            ("boq_dinov2", "boq", lambda: authors_boq(args.ext, "dinov2"), [(322, 322), (280, 420)])
        )
        runs.append(
            (
                "boq_resnet50",
                "boq",
                lambda: authors_boq(args.ext, "resnet50"),
                [(384, 384), (320, 480)],
            )
        )
    if "megaloc" in wanted:
        runs.append(
            ("megaloc", "megaloc", lambda: authors_megaloc(args.ext), [(322, 322), (300, 400)])
        )

    details, summary = {}, {}
    for seed, (key, family, make, sizes) in enumerate(runs):
        authors, file = make()
        details[key] = compare(
            importlib.import_module(f"wakd.zoo.{family}"), authors, file, sizes, seed
        )
        summary[key] = max(s["max_abs_error"] for s in details[key]["sizes"].values())
        print(key, json.dumps(details[key]["sizes"]), file=sys.stderr)
    repos = {"serizba/salad": "salad", "amaralibey/Bag-of-Queries": "Bag-of-Queries", "gmberton/MegaLoc": "MegaLoc",
             "facebookresearch/dinov2": "dinov2"}  # fmt: skip
    record = {
        "zoo_parity_max_abs_error": summary,
        "details": details,
        "authors_commits": {repo: commit(args.ext / folder) for repo, folder in repos.items()},
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=1))
    atomic_write_json(RESULT, record)


if __name__ == "__main__":
    main()
