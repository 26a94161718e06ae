"""Where pretrained ImageNet weights live, checked without importing torch.

Importing torch and torchvision takes several seconds on a busy CPU, so a run whose start
weights are missing would only fail after that. Entry points call
:func:`check_weights_available` first; the file table below is torchvision's own (a test
compares it with ``torchvision.models.*_Weights``) and the cache folder follows
``torch.hub.get_dir()``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

# Backbone name -> the torchvision weights URL of its ImageNet start (IMAGENET1K_V1 for
# VGG16 and ResNet18, V2 for MobileNetV3-Large and ResNet50).
IMAGENET_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "mobilenetv3_large": "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(os.path.expanduser(torch_home)) / "hub"


def imagenet_cache_file(name: str) -> Path:
    """Where torch hub keeps torchvision's ImageNet weights for backbone ``name``."""
    if name not in IMAGENET_URLS:
        raise ValueError(f"no ImageNet weights known for backbone {name!r}; available: {sorted(IMAGENET_URLS)}")
    return torch_hub_dir() / "checkpoints" / IMAGENET_URLS[name].rsplit("/", 1)[1]


def check_weights_available(name: str, weights: str | os.PathLike | None) -> None:
    """Fail at once, naming the file, when ``weights`` ('imagenet' or a path) is not on disk."""
    if weights is None:
        return
    if str(weights) != "imagenet":
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weight file not found: {weights} (model.weights)")
        return
    path = imagenet_cache_file(name)
    if not path.is_file():
        # Never download: the machines this runs on are offline.
        raise FileNotFoundError(
            f"ImageNet weights for {name!r} not found at {path} (no download is attempted). "
            f"Either copy {path.name} (from {IMAGENET_URLS[name]}) into {path.parent}, "
            f"pass the file explicitly: model.weights=/path/to/{path.name}, "
            f"or start from random weights: model.weights=null"
        )


def check_start_files(cfg: DictConfig) -> None:
    """The student's start weights and the teacher's checkpoint must exist before any data
    is read or generated: a missing file fails in seconds, naming it."""
    if not cfg.ckpt_path:  # a resumed run restores every weight from its checkpoint
        check_weights_available(cfg.model.name, cfg.model.weights)
    if cfg.get("teacher") is None:
        return
    if "zoo_family" in cfg.teacher:  # a published model: its file is teacher.weights
        weights = cfg.teacher.weights
        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"teacher={cfg.teacher.name}: published weight file {weights or '(none given)'} not found. "
                "Download it yourself (docs/zoo.md says where; wakd never downloads) and pass "
                "teacher.weights=PATH."
            )
        return
    ckpt = Path(cfg.teacher.ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint not found: {ckpt}\n"
            f"Train one first with `python train.py experiment=baseline model={cfg.teacher.name} "
            f"teacher=none dataset={cfg.dataset.kind} task_name=teacher` and copy its "
            f"checkpoints/best.ckpt there, or pass teacher.ckpt=PATH."
        )
