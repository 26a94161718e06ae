#!/usr/bin/env python
"""Parity of ``wakd.zoo`` with the published models' own code (issue 33).

Each family is built with its authors' code, from public snapshots checked out *outside*
the project (``--ext DIR`` or ``$WAKD_EXT``: CosPlace, EigenPlaces, OpenIBL,
deep-visual-geo-localization-benchmark, pytorch-NetVlad, MixVPR) and imported by path at
run time; none of their code is copied here. Weights are random (torchvision's
initialisation, every parameter perturbed, BatchNorm statistics measured on the images in
one training-mode pass so that activations stay in range), saved in the published file
format, loaded back with ``wakd.zoo.load``, and both models describe the same rendered
synthetic-city views (fp32, CPU). The authors' models get the pixels their own test
transforms give (``Normalize`` of the 0-1 tensor); wakd's get the 0-1 tensor.

Run-time shims (the checkouts are never edited): torchvision constructors asked for
``pretrained=True`` / default weights get random weights instead (nothing downloads);
EigenPlaces' ``torch.hub.load`` of CosPlace weights returns a random torchvision model;
DVGLB's unused ``transformers`` / ``googledrivedownloader`` imports and OpenIBL's ``cv2``
import get empty stand-in modules; OpenIBL's ``PCA.load`` moves tensors with ``.cuda()``,
lent the identity on this CPU-only run.

    .venv/bin/python bench/zoo_parity.py --ext DIR [--quick]

Writes ``zoo_parity_max_abs_error`` ({family: worst case}) to bench/results.json and the
"zoo_parity" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import types
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, merge_results, replace_section

from wakd import zoo
from wakd.models.normalization import IMAGENET_MEAN, IMAGENET_STD, OPENIBL_MEAN, OPENIBL_STD
from wakd.synth.synthcity import City

REPOS = {
    "cosplace": "CosPlace",
    "eigenplaces": "EigenPlaces",
    "openibl": "OpenIBL",
    "dvglb": "deep-visual-geo-localization-benchmark",
    "netvlad_pytorch": "pytorch-NetVlad",
    "mixvpr": "MixVPR",
}
IMAGENET = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def city_views(size: tuple[int, int], count: int = 4) -> torch.Tensor:
    """``count`` database-like views of the demo city, 0-1 float [count, 3, H, W]."""
    city = City("demo", seed=0)
    views = [city.render(60.0 + 25 * i, 8.0, 90.0 * i, size=size) for i in range(count)]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def random_torchvision() -> Iterator[None]:
    """torchvision model constructors ignore ``pretrained`` / ``weights``: random init, no download."""
    names = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "alexnet")
    real = {n: getattr(torchvision.models, n) for n in names}

    def random_only(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(*args: object, pretrained: bool = False, weights: object = None, **kwargs: object) -> nn.Module:
            return factory(weights=None, **kwargs)
        return build

    for n, factory in real.items():
        setattr(torchvision.models, n, random_only(factory))
    try:
        yield
    finally:
        for n, factory in real.items():
            setattr(torchvision.models, n, factory)


def import_from(repo: Path, *modules: str) -> list[types.ModuleType]:
    sys.path.insert(0, str(repo))
    try:
        return [__import__(m, fromlist=["_"]) for m in modules]
    finally:
        sys.path.remove(str(repo))


@torch.no_grad()
def randomise(model: nn.Module, images: torch.Tensor, seed: int) -> nn.Module:
    """Perturb every parameter, redraw NetVLAD's; BatchNorm statistics from one training-mode
    pass on ``images``."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = p.std() if p.numel() > 1 and p.std() > 0 else p.abs().mean().clamp_min(1.0)
        p.add_(torch.randn(p.shape, generator=gen) * 0.05 * scale)
    for m in model.modules():
        if isinstance(getattr(m, "centroids", None), nn.Parameter):
            # NetVLAD: centroids at the scale of the L2-normalised features and a sharp
            # assignment, so that the residuals (not the centroids) make the descriptor
            k, dim = m.centroids.shape
            m.centroids.copy_(torch.randn(k, dim, generator=gen) / dim**0.5)
            m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=gen) * 20 / dim**0.5)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if batchnorms:
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of this one pass
        model.train()
        model(images)
    return model.eval()


def compare(
    name: str, reference: nn.Module, reference_input: torch.Tensor, file: Path, images: torch.Tensor,
    **options: object,
) -> dict[str, object]:
    with torch.no_grad():
        expected = reference(reference_input)
        ours = zoo.load(file, **options)
        got = ours(images)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: wakd {tuple(got.shape)} vs reference {tuple(expected.shape)}")
    error = float((got - expected).abs().max())
    spread = float((expected[0] - expected[1]).abs().max())  # 0 would mean a degenerate comparison
    print(f"{name:48s} {ours.zoo_description:52s} max|diff| {error:.2e} (between images {spread:.1e})", flush=True)
    return {"case": name, "model": ours.zoo_description, "dim": int(got.shape[1]), "max_abs_error": error,
            "spread": spread}


# -- families ---------------------------------------------------------------------------


def gem_fc_cases(ext: Path, tmp: Path, images: torch.Tensor, family: str, sizes: list[tuple[str, int]]) -> list[dict]:
    repo = ext / REPOS[family]
    if family == "cosplace":
        (network,) = import_from(repo, "cosplace_model.cosplace_network")
        make = network.GeoLocalizationNet
    else:
        (network,) = import_from(repo, "eigenplaces_model.eigenplaces_network")
        make = network.GeoLocalizationNet_
    rows = []
    for seed, (backbone, dim) in enumerate(sizes):
        stand_in = lambda *a, backbone=backbone, **k: getattr(torchvision.models, backbone.lower())()  # noqa: E731
        with random_torchvision(), patched(torch.hub, "load", stand_in):
            model = randomise(make(backbone, dim), IMAGENET(images), seed)
        file = tmp / f"{backbone}_{dim}_{family}.pth"
        torch.save(model.state_dict(), file)
        rows.append(compare(f"{family} {backbone} {dim}", model, IMAGENET(images), file, images))
    return rows


def openibl_cases(ext: Path, tmp: Path, images: torch.Tensor) -> list[dict]:
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    models, pca_module = import_from(ext / REPOS["openibl"], "ibl.models", "ibl.pca")
    normalize = T.Normalize(OPENIBL_MEAN, OPENIBL_STD)
    rows = []
    # The hub file: EmbedNetPCA, PCA folded into pca_layer (1x1 conv 32768 -> 4096).
    with random_torchvision():
        base = models.create("vgg16", pretrained=False)
    hub = models.create("embednetpca", base, models.create("netvlad", dim=base.feature_dim))
    hub = randomise(hub, normalize(images), 0)
    with torch.no_grad():
        hub.pca_layer.weight.mul_(100)  # random 1x1 conv: spread the projections beyond rounding
    torch.save(hub.state_dict(), tmp / "vgg16_netvlad.pth")
    rows.append(compare("openibl hub vgg16_netvlad (PCA 4096)", hub, normalize(images), tmp / "vgg16_netvlad.pth", images))
    del hub
    # A Drive checkpoint: EmbedNet under DDP + pca_params_<ckpt>.h5, through OpenIBL's own PCA.
    with random_torchvision():
        base = models.create("vgg16", pretrained=False)
    net = randomise(models.create("embednet", base, models.create("netvlad", dim=base.feature_dim)), normalize(images), 1)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 4, "best_recall5": 0.9}, tmp / "model_best.pth.tar")
    gen = np.random.default_rng(0)
    dim, n = 64 * 512, 4096
    with h5py.File(tmp / "pca_params_model_best.h5", "w") as f:
        u = (gen.standard_normal((dim, n), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)  # ~orthonormal
        mu = (gen.standard_normal((dim, 1)) * 1e-3).astype(np.float32)
        f["U"], f["lams"], f["mu"], f["Utmu"] = u, gen.uniform(1e-5, 1e-3, n).astype(np.float32), mu, u.T @ mu
        del u
    pca = pca_module.PCA(n, True, str(tmp / "pca_params_model_best.h5"))
    with patched(torch.Tensor, "cuda", lambda self, *a, **k: self):
        pca.load()

    class WithPCA(nn.Module):  # OpenIBL's evaluator: EmbedNet's VLAD, then PCA.infer
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pca.infer(net(x)[1])

    rows.append(
        compare("openibl Drive checkpoint + pca_params h5 (4096)", WithPCA(), normalize(images),
                tmp / "model_best.pth.tar", images, pca=tmp / "pca_params_model_best.h5")
    )
    return rows


def dvglb_cases(ext: Path, tmp: Path, images: torch.Tensor, quick: bool) -> list[dict]:
    for name, attr in (("transformers", "ViTModel"), ("google_drive_downloader", "GoogleDriveDownloader")):
        stub = types.ModuleType(name)
        setattr(stub, attr, None)
        sys.modules.setdefault(name, stub)
    (network,) = import_from(ext / REPOS["dvglb"], "model.network")
    cases = [("resnet18conv4", "netvlad", None), ("resnet50conv4", "netvlad", None), ("vgg16", "netvlad", None),
             ("resnet101conv5", "gem", None), ("resnet50conv5", "gem", 2048), ("resnet18conv5", "gem", None)]
    rows = []
    for seed, (backbone, aggregation, fc) in enumerate(cases[:2] if quick else cases):
        args = Namespace(backbone=backbone, aggregation=aggregation, l2="before_pool", fc_output_dim=fc,
                         netvlad_clusters=64, pretrain="imagenet", trunc_te=None, freeze_te=None, resize=[480, 640])
        with random_torchvision():
            model = randomise(network.GeoLocalizationNet(args), IMAGENET(images), seed)
        file = tmp / f"dvglb_{backbone}_{aggregation}.pth"
        torch.save({"epoch_num": 3, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                    "best_r5": 0.9}, file)
        rows.append(compare(f"dvglb {backbone} {aggregation}{f' fc{fc}' if fc else ''}", model, IMAGENET(images), file, images))
    return rows


def netvlad_pytorch_cases(ext: Path, tmp: Path, images: torch.Tensor) -> list[dict]:
    (netvlad,) = import_from(ext / REPOS["netvlad_pytorch"], "netvlad")
    rows = []
    for seed, (arch, vladv2) in enumerate((("vgg16", False), ("alexnet", True))):
        # main.py's model: nn.Module with 'encoder' (features[:-2]) and 'pool' (its NetVLAD)
        trunk = getattr(torchvision.models, arch)(weights=None).features
        model = nn.Module()
        model.add_module("encoder", nn.Sequential(*list(trunk.children())[:-2]))
        model.add_module("pool", netvlad.NetVLAD(num_clusters=64, dim=512 if arch == "vgg16" else 256, vladv2=vladv2))
        model.forward = lambda x, m=model: m.pool(m.encoder(x))
        model = randomise(model, IMAGENET(images), seed)
        file = tmp / f"{arch}_checkpoint.pth.tar"
        torch.save({"epoch": 3, "best_score": 0.8, "state_dict": model.state_dict()}, file)
        rows.append(compare(f"netvlad_pytorch {arch}{' vladv2' if vladv2 else ''}", model, IMAGENET(images), file, images))
    return rows


def mixvpr_cases(ext: Path, tmp: Path) -> list[dict]:
    (helper,) = import_from(ext / REPOS["mixvpr"], "models.helper")
    images = city_views((320, 320), 2)
    rows = []
    for seed, (channels, rows_out) in enumerate(((1024, 4), (256, 2), (128, 1))):
        model = nn.Module()  # VPRModel's attributes (main.py needs the training stack to import)
        with random_torchvision():
            model.backbone = helper.get_backbone("resnet50", pretrained=False, layers_to_crop=[4])
        model.aggregator = helper.get_aggregator("MixVPR", {
            "in_channels": 1024, "in_h": 20, "in_w": 20, "out_channels": channels,
            "mix_depth": 4, "mlp_ratio": 1, "out_rows": rows_out})
        model.forward = lambda x, m=model: m.aggregator(m.backbone(x))
        model = randomise(model, IMAGENET(images), seed)
        file = tmp / f"resnet50_MixVPR_{channels * rows_out}_channels({channels})_rows({rows_out}).ckpt"
        torch.save(model.state_dict(), file)
        rows.append(compare(f"mixvpr resnet50 {channels}x{rows_out}", model, IMAGENET(images), file, images))
    return rows


def commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ext", type=Path, default=os.environ.get("WAKD_EXT"), required="WAKD_EXT" not in os.environ,
        help="the folder holding the authors' snapshots (default: $WAKD_EXT)",
    )
    parser.add_argument("--quick", action="store_true", help="one or two backbones per family")
    parser.add_argument("--families", nargs="*", default=list(REPOS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    images = city_views((192, 256))
    cosplace = [("ResNet18", 512), ("ResNet50", 2048), ("VGG16", 512), ("ResNet101", 2048), ("ResNet152", 2048),
                ("ResNet50", 32), ("VGG16", 64)]
    eigenplaces = [("ResNet18", 256), ("ResNet50", 2048), ("VGG16", 512), ("ResNet101", 128), ("ResNet50", 512)]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        runners = {
            "cosplace": lambda: gem_fc_cases(args.ext, tmp_dir, images, "cosplace", cosplace[:2] if args.quick else cosplace),
            "eigenplaces": lambda: gem_fc_cases(args.ext, tmp_dir, images, "eigenplaces", eigenplaces[:2] if args.quick else eigenplaces),
            "openibl": lambda: openibl_cases(args.ext, tmp_dir, images),
            "dvglb": lambda: dvglb_cases(args.ext, tmp_dir, images, args.quick),
            "netvlad_pytorch": lambda: netvlad_pytorch_cases(args.ext, tmp_dir, images),
            "mixvpr": lambda: mixvpr_cases(args.ext, tmp_dir),
        }
        for family in args.families:
            results[family] = runners[family]()
            for f in tmp_dir.iterdir():
                f.unlink()
    worst = {family: max(r["max_abs_error"] for r in rows) for family, rows in results.items()}
    seconds = time.perf_counter() - start
    merge_results({"zoo_parity_max_abs_error": worst})
    lines = [
        "## Zoo parity: wakd.zoo against the authors' code (`bench/zoo_parity.py`)",
        "",
        f"Machine: {machine()}; {seconds:.0f} s. Random weights in each published file format, "
        "loaded with `wakd.zoo.load`; 4 rendered demo-city views (192x256; MixVPR: 2 at 320x320), fp32, CPU. "
        "Goal: max |difference| <= 1e-5.",
        "",
        "Authors' code (fetched snapshots, run outside the project): "
        + "; ".join(f"{REPOS[f]} `{commit(args.ext / REPOS[f])[:12]}`" for f in results),
        "",
        "| case | wakd.zoo model | dim | max abs diff | image 0 vs 1 (reference) |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['case']} | {r['model']} | {r['dim']} | {r['max_abs_error']:.1e} | {r['spread']:.1e} |"
            for rows in results.values()
            for r in rows
        ),
        "",
        "**zoo_parity_max_abs_error** = " + ", ".join(f"{f} {v:.1e}" for f, v in worst.items())
        + f" (goal <= 1e-5: {'met' if max(worst.values()) <= 1e-5 else 'NOT met'}).",
    ]
    replace_section("zoo_parity", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
