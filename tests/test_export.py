"""Exported ONNX / TorchScript descriptor networks reproduce PyTorch's descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from test_inference import randomise_batchnorm

from wakd.export import SUFFIXES, run
from wakd.models import PCAWhitening, PlaceNet, build_place_net
from wakd.models.inference import OnnxDescriptorNet

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZE = (64, 86)  # the tiny city's images

SMALL_MODELS = {
    "resnet18": {"backbone": "resnet18", "cut": "layer3", "proj_dim": None, "num_clusters": 8},
    "mobilenetv3": {
        "backbone": "mobilenetv3_large",
        "cut": "stride16",
        "proj_dim": 64,
        "num_clusters": 8,
    },
}


def save_wakd_checkpoint(path: Path, name: str) -> PlaceNet:
    """A randomly initialised small model (BatchNorm statistics non-trivial) in the wakd layout."""
    torch.manual_seed(0)
    spec = SMALL_MODELS[name]
    net = build_place_net(**spec)
    randomise_batchnorm(net)
    net_cfg = {"_target_": "wakd.models.build_place_net", "weights": None, **spec}
    torch.save(
        {
            "state_dict": {"net." + k: v for k, v in net.state_dict().items()},
            "wakd": {"model": {"name": spec["backbone"], "weights": None, "net": net_cfg}},
        },
        path,
    )
    return net.eval()


def export_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def load_exported(path: Path, fmt: str) -> torch.nn.Module:
    if fmt == "onnx":
        return OnnxDescriptorNet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit's deprecation
        return torch.jit.load(str(path))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_export_matches_pytorch(tmp_path: Path, name: str, fmt: str) -> None:
    ckpt = tmp_path / f"{name}.ckpt"
    net = save_wakd_checkpoint(ckpt, name)
    out = run(export_cfg([f"ckpt={ckpt}", f"format={fmt}", "image_size=[64,86]"]))
    assert out == ckpt.with_suffix(SUFFIXES[fmt])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name, out.name])  # no temp
    exported = load_exported(out, fmt)
    images = torch.randn(5, 3, *IMAGE_SIZE)  # batch size differs from the traced one
    with torch.no_grad():
        expected = net(images)
        got = exported(images)
    assert got.shape == expected.shape == (5, net.descriptor_dim)
    assert (got - expected).abs().max().item() < 1e-4


def test_onnx_export_with_pca_and_other_image_size(tmp_path: Path) -> None:
    ckpt = tmp_path / "resnet18.ckpt"
    net = save_wakd_checkpoint(ckpt, "resnet18")
    pca_path = tmp_path / "pca.safetensors"
    PCAWhitening.fit(torch.randn(40, net.descriptor_dim), out_dim=16).save(pca_path)
    out = tmp_path / "deploy" / "model.onnx"
    run(export_cfg([f"ckpt={ckpt}", f"pca={pca_path}", f"out={out}", "image_size=[64,86]"]))
    net.pca = PCAWhitening.load(pca_path)
    exported = OnnxDescriptorNet(out)
    assert exported.descriptor_dim == 16
    images = torch.randn(2, 3, 96, 128)  # height and width are dynamic too
    with torch.no_grad():
        assert (exported(images) - net(images)).abs().max().item() < 1e-4


def test_pca_of_wrong_size_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "resnet18.ckpt"
    save_wakd_checkpoint(ckpt, "resnet18")
    pca_path = tmp_path / "pca.safetensors"
    PCAWhitening.fit(torch.randn(20, 100), out_dim=8).save(pca_path)
    with pytest.raises(ValueError, match="100-d"):
        run(export_cfg([f"ckpt={ckpt}", f"pca={pca_path}"]))
    assert not ckpt.with_suffix(".onnx").exists()


def test_command_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    save_wakd_checkpoint(ckpt, "resnet18")
    out = tmp_path / "m.pt"
    result = subprocess.run(
        [sys.executable, "-m", "wakd.export", f"ckpt={ckpt}", "format=torchscript",
         f"out={out}", "image_size=[64,86]"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file() and f"wrote {out}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "m.pt"]  # no Hydra run folder
