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

    PYTHONPATH=src .venv/bin/python bench/zoo_parity_vit.py --ext DIR [--families salad,boq,megaloc|none]
        [--write-fixture]

Prints {family_variant: max_abs_error} as JSON and writes bench/zoo_parity_vit.json.

``--write-fixture`` also builds each family at a reduced size with the authors' code (ViT
depth 2, width 32, one head, 56 x 56 position grid; small aggregators; BoQ on ResNet18),
fills it with ``tests/zoo_vit_states.synthetic_state`` and writes its key layout and its
descriptors of seeded images to tests/fixtures/zoo_vit_parity.json, so tests check the
same parity without the authors' code. The reduced DINOv2 is DINOv2's
``DinoVisionTransformer`` with the hub's arguments (only the sizes changed); SALAD's
backbone reads its width from a table of the full sizes, so its ``num_channels`` is set to
the reduced width.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
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
REPOS = {
    "serizba/salad": "salad",
    "amaralibey/Bag-of-Queries": "Bag-of-Queries",
    "gmberton/MegaLoc": "MegaLoc",
    "facebookresearch/dinov2": "dinov2",
}
FIXTURE = ROOT / "tests" / "fixtures" / "zoo_vit_parity.json"
REDUCED_VIT = {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 1}


def import_file(path: Path, alias: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reduced_dinov2(dinov2_dir: Path) -> nn.Module:
    """DINOv2's ViT as its hub builds it (dinov2/hub/backbones.py), at REDUCED_VIT's sizes."""
    sys.path.insert(0, str(dinov2_dir))
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    block = functools.partial(NestedTensorBlock, attn_class=MemEffAttention)
    return DinoVisionTransformer(
        patch_size=14, mlp_ratio=4, block_fn=block, init_values=1.0, ffn_layer="mlp", block_chunks=0,
        num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1, **REDUCED_VIT,
    )  # fmt: skip


@contextmanager
def local_dinov2(dinov2_dir: Path, reduced: bool = False) -> Iterator[None]:
    """Redirect ``torch.hub.load('facebookresearch/dinov2', name)`` to the local checkout,
    random weights (``reduced``: REDUCED_VIT's sizes)."""
    real_load = torch.hub.load

    def load(repo: str, name: str, *args, **kwargs):
        if repo != "facebookresearch/dinov2":
            raise RuntimeError(f"unexpected torch.hub.load({repo!r})")
        if reduced:
            return reduced_dinov2(dinov2_dir)
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


def reduced_authors(ext: Path, variant: str) -> nn.Module:
    """The authors' model of ``variant`` at the fixture's reduced sizes."""
    small_agg = {"num_clusters": 4, "cluster_dim": 8, "token_dim": 8}
    width = REDUCED_VIT["embed_dim"]
    if variant == "salad":
        backbones = import_file(ext / "salad/models/backbones/dinov2.py", "authors_salad_dinov2")
        aggregators = import_file(
            ext / "salad/models/aggregators/salad.py", "authors_salad_aggregator"
        )
        with local_dinov2(ext / "dinov2", reduced=True):
            backbone = backbones.DINOv2(
                "dinov2_vitb14", num_trainable_blocks=1, return_token=True, norm_layer=True
            )
        backbone.num_channels = width
        aggregator = aggregators.SALAD(num_channels=width, **small_agg)
        # SALAD's hidden width is fixed at 512 in its code; it stays.
        return Authors(backbone, aggregator, lambda out: out)
    if variant in ("boq_dinov2", "boq_resnet18"):
        backbones = import_file(ext / "Bag-of-Queries/src/backbones.py", "authors_boq_backbones")
        boq = import_file(ext / "Bag-of-Queries/src/boq.py", "authors_boq")
        if variant == "boq_dinov2":
            with local_dinov2(ext / "dinov2", reduced=True):
                backbone = backbones.DinoV2(unfreeze_n_blocks=1)
        else:
            backbone = backbones.ResNet("resnet18", pretrained=False, crop_last_block=True)
        aggregator = boq.BoQ(
            backbone.out_channels, proj_channels=64, num_queries=4, num_layers=2, row_dim=4
        )
        return Authors(backbone, aggregator, lambda out: out[0])
    megaloc = import_file(ext / "MegaLoc/megaloc_model.py", "authors_megaloc")
    model = megaloc.MegaLoc(feat_dim=48, num_clusters=4, cluster_dim=8, token_dim=8, mlp_dim=16)
    model.backbone = megaloc.DINOv2(
        image_size=REDUCED_VIT["img_size"], embed_dim=width, depth=REDUCED_VIT["depth"], num_heads=1
    )
    agg_config = {
        "num_channels": width,
        "num_clusters": 4,
        "cluster_dim": 8,
        "token_dim": 8,
        "mlp_dim": 16,
    }
    model.aggregator = megaloc.Aggregator(
        feat_dim=48, agg_config=agg_config, salad_out_dim=4 * 8 + 8
    )
    return Authors(nn.Identity(), model, lambda out: out)


FIXTURE_SIZES = {
    "salad": [(56, 56), (42, 70)],
    "boq_dinov2": [(56, 56), (42, 70)],
    "boq_resnet18": [(64, 64), (48, 80)],
    "megaloc": [(56, 56), (50, 64)],
}


def write_fixture(ext: Path) -> None:
    states = import_file(ROOT / "tests" / "zoo_vit_states.py", "zoo_vit_states")
    variants = {}
    for seed, (variant, sizes) in enumerate(FIXTURE_SIZES.items()):
        authors = reduced_authors(ext, variant).eval()
        layout = states.layout_of(
            published_state(authors, "model.safetensors" if variant == "megaloc" else ".pth")
        )
        state = states.synthetic_state(layout, seed)
        load_published_into(authors, state, variant == "megaloc")
        generator = torch.Generator().manual_seed(100 + seed)
        outputs = []
        with torch.no_grad():
            for height, width in sizes:
                images = torch.rand(2, 3, height, width, generator=generator)
                outputs.append({"size": [height, width], "descriptors": authors(images).tolist()})
        variants[variant] = {
            "seed": seed,
            "image_seed": 100 + seed,
            "layout": layout,
            "outputs": outputs,
        }
    repos = {k: commit(ext / folder) for k, folder in REPOS.items()}
    meta = {
        "produced_by": "bench/zoo_parity_vit.py --write-fixture",
        "authors_commits": repos,
        "torch": torch.__version__,
    }
    atomic_write_json(FIXTURE, {"meta": meta, "variants": variants})
    print(f"wrote {FIXTURE}", file=sys.stderr)


def published_state(model: nn.Module, file: str) -> dict[str, torch.Tensor]:
    """The model's state dict under its published key names."""
    # MegaLoc's whole model sits in Authors.aggregator: its file has MegaLoc's own key names.
    strip = file.endswith(".safetensors")
    return {k.removeprefix("aggregator.") if strip else k: v for k, v in model.state_dict().items()}


def load_published_into(model: nn.Module, state: dict[str, torch.Tensor], megaloc: bool) -> None:
    model.load_state_dict(
        {f"aggregator.{k}" if megaloc else k: v for k, v in state.items()}, strict=True
    )


def save_published(model: nn.Module, path: Path) -> None:
    state = published_state(model, path.name)
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


def wakd_zoo() -> ModuleType:
    return importlib.import_module("wakd.zoo")


def zoo_loader() -> Callable[[Path], nn.Module] | None:
    """``wakd.zoo.load`` once the zoo core provides it (with these families registered)."""
    return getattr(wakd_zoo(), "load", None)


def compare(
    family: ModuleType, authors: nn.Module, file: str, sizes: list[tuple[int, int]], seed: int
) -> dict:
    """The authors' model vs the family built from its saved file (detect + build + strict
    load), and vs ``wakd.zoo.load`` of the same file (detection among all families) where
    the zoo core has it."""
    perturb(authors, seed)
    authors.eval()
    load = zoo_loader()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file
        save_published(authors, path)
        state = load_published(path)
        zoo_model = (
            load(path)
            if load is not None and family.NAME in getattr(wakd_zoo(), "FAMILIES", ())
            else None
        )
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
            if zoo_model is not None:
                errors[f"{height}x{width}"]["zoo_load_max_abs_error"] = (
                    (expected - zoo_model(images)).abs().max().item()
                )
    return {"describe": family.describe(options), "options": options, "sizes": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ext", type=Path, default=os.environ.get("WAKD_EXT"), required="WAKD_EXT" not in os.environ,
        help="the folder holding the authors' snapshots (default: $WAKD_EXT)",
    )
    parser.add_argument("--families", default="salad,boq,megaloc")
    parser.add_argument("--write-fixture", action="store_true")
    args = parser.parse_args()
    if args.write_fixture:
        write_fixture(args.ext)
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

    if not runs:
        return
    details, summary = {}, {}
    for seed, (key, family, make, sizes) in enumerate(runs):
        authors, file = make()
        details[key] = compare(
            importlib.import_module(f"wakd.zoo.{family}"), authors, file, sizes, seed
        )
        summary[key] = max(s["max_abs_error"] for s in details[key]["sizes"].values())
        print(key, json.dumps(details[key]["sizes"]), file=sys.stderr)
    record = {
        "zoo_parity_max_abs_error": summary,
        "details": details,
        "authors_commits": {repo: commit(args.ext / folder) for repo, folder in REPOS.items()},
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=1))
    atomic_write_json(RESULT, record)


if __name__ == "__main__":
    main()
