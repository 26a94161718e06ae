"""Export a checkpoint's descriptor network (backbone + NetVLAD or GeM [+ PCA]) for deployment.

    python -m wakd.export ckpt=PATH format=onnx|torchscript [out=PATH] [pca=PATH]
        [image_size=[480,640]]

BatchNorm is folded into the convolutions first. The input is RGB pixels as float32 in
[0, 1] (``ToTensor``'s scale, un-normalised): the model's own input normalisation
(ImageNet's, OpenIBL's MatConvNet scale, ...) is part of the exported graph.
ONNX: opset 17, input ``images`` [B, 3, H, W] (batch, height and width dynamic),
output ``descriptors`` [B, D]; run it
with ``wakd.models.inference.OnnxDescriptorNet`` (``eval.py backend=onnxruntime``).
TorchScript: traced, ``torch.jit.load(path)(images)``. The exported model is
checked against the PyTorch network on random images before it replaces ``out``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from wakd.atomic import atomic_write_path
from wakd.cli import run_job
from wakd.jobs.common import build_net, build_zoo_model, model_config_for
from wakd.models.inference import TOLERANCE, OnnxDescriptorNet, export_onnx, fold_batchnorm
from wakd.models.pca import PCAWhitening
from wakd.models.place_net import PlaceNet

Format = Literal["onnx", "torchscript"]
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(net: nn.Module, example: torch.Tensor, path: Path, fmt: Format) -> nn.Module:
    """Write ``net`` to ``path`` in ``fmt``; return the written model, loaded back."""
    if fmt == "onnx":
        export_onnx(net, example, path)
        return OnnxDescriptorNet(path)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but it is still what C++ and
        # mobile deployments load: nothing a user of this command can act on.
        warnings.simplefilter("ignore", category=FutureWarning)
        # check_trace=False: the export is checked below, against eager PyTorch.
        torch.jit.save(torch.jit.trace(net, example, check_trace=False), str(path))
        return torch.jit.load(str(path))


@torch.no_grad()
def export_descriptor_net(
    net: nn.Module, out: str | os.PathLike, fmt: Format, image_size: tuple[int, int] = (480, 640)
) -> float:
    """Write ``net``'s descriptor path to ``out`` atomically; return the largest absolute
    difference to eager PyTorch on random images (ValueError above ``TOLERANCE``)."""
    if fmt not in SUFFIXES:
        raise ValueError(f"format={fmt!r}: choose one of {sorted(SUFFIXES)}")
    folded = fold_batchnorm(net)
    generator = torch.Generator().manual_seed(0)
    height, width = image_size
    example = torch.randn(2, 3, height, width, generator=generator)
    # A different batch size than the example: checks that the batch axis is really dynamic.
    check = torch.randn(3, 3, height, width, generator=generator)
    expected = net.eval()(check)
    with atomic_write_path(out) as tmp:
        exported = _write(folded, example, tmp, fmt)
        error = (exported(check) - expected).abs().max().item()
        if error > TOLERANCE:
            raise ValueError(
                f"{fmt} export differs from PyTorch by {error:.2e} (> {TOLERANCE}); not written"
            )
    return error


def run(cfg: DictConfig) -> Path:
    """The ``python -m wakd.export`` job: build the network from ``ckpt`` (or a published
    model from ``model.weights``), export, report."""
    if "zoo_family" in cfg.model:  # a published model (wakd.zoo): its file is model.weights
        net, source = build_zoo_model(cfg.model), cfg.model.weights
    elif cfg.ckpt is None:
        raise ValueError(
            "ckpt=PATH is required (a wakd checkpoint); a published model is exported with "
            "model=<family> model.weights=PATH (docs/zoo.md)"
        )
    else:
        net, source = build_net(model_config_for(cfg, cfg.ckpt), cfg.ckpt), cfg.ckpt
    if cfg.pca:
        if not isinstance(net, PlaceNet):
            raise ValueError(f"pca={cfg.pca}: {type(net).__name__} has no NetVLAD to whiten")
        net.pca = PCAWhitening.load(cfg.pca, in_dim=net.descriptor_dim)
    out = Path(cfg.out) if cfg.out else Path(source).with_suffix(SUFFIXES[cfg.format])
    error = export_descriptor_net(net, out, cfg.format, tuple(cfg.image_size))
    print(
        f"wrote {out} ({cfg.format}, {getattr(net, 'descriptor_dim', '?')}-d descriptors, "
        f"max abs difference to PyTorch {error:.1e})"
    )
    return out


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="export")
def main(cfg: DictConfig) -> None:
    run_job(run, cfg)


if __name__ == "__main__":
    main()
