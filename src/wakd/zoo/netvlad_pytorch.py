"""Nanne/pytorch-NetVlad (a PyTorch port of NetVLAD, Arandjelovic et al., CVPR 2016).

Its ``checkpoint.pth.tar`` / ``model_best.pth.tar`` are ``{'epoch', 'state_dict',
'best_score', 'optimizer', ...}``; the state dict holds ``encoder.{i}.*`` (VGG16 or AlexNet
features without the last ReLU and max-pool) and ``pool.conv.weight`` (plus
``pool.conv.bias`` with ``--vladv2``), ``pool.centroids``; multi-GPU runs wrap both in
DataParallel (``encoder.module.*``, dropped on reading). ImageNet normalisation, images
at their own size. Its ``--pooling=max|avg`` models have no pooling weights and no layout of
their own, so they are not recognised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from wakd.models.netvlad import NetVLAD
from wakd.zoo.layers import (
    PixelNormalization,
    alexnet_trunk,
    alexnet_trunk_present,
    vgg16_trunk,
    vgg16_trunk_present,
)
from wakd.zoo.targets import DistillTargets, activation_targets

NAME = "netvlad_pytorch"
IMAGE_SIZE = None
RESIZE = "none"
PREFIXES = ("encoder", "pool")
_TRUNKS = {"vgg16": (vgg16_trunk, 512), "alexnet": (alexnet_trunk, 256)}


class NetVladNet(nn.Module):
    """0-1 RGB [B, 3, H, W] -> NetVLAD descriptor [B, num_clusters * C]."""

    def __init__(self, arch: str = "vgg16", num_clusters: int = 64, vladv2: bool = False) -> None:
        super().__init__()
        if arch not in _TRUNKS:
            raise ValueError(f"arch={arch!r}: choose one of {', '.join(_TRUNKS)}")
        trunk, channels = _TRUNKS[arch]
        self.normalize = PixelNormalization("imagenet")
        self.encoder = trunk()
        self.pool = NetVLAD(num_clusters, channels)
        if vladv2:  # VLAD v2's assignment has a bias per cluster
            self.pool.conv = nn.Conv2d(channels, num_clusters, kernel_size=1, bias=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.encoder(self.normalize(images)))

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.encoder(self.normalize(images))
        return activation_targets(features, self.pool(features))


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    pool = {k for k in state if k.startswith("pool.")}
    if not {"pool.conv.weight", "pool.centroids"} <= pool <= {"pool.conv.weight", "pool.conv.bias", "pool.centroids"}:
        return None
    if vgg16_trunk_present(state, "encoder."):
        arch = "vgg16"
    elif alexnet_trunk_present(state, "encoder."):
        arch = "alexnet"
    else:
        return None
    return {
        "arch": arch,
        "num_clusters": int(state["pool.centroids"].shape[0]),
        "vladv2": "pool.conv.bias" in state,
    }


def build(arch: str = "vgg16", num_clusters: int = 64, vladv2: bool = False) -> nn.Module:
    return NetVladNet(arch, num_clusters, vladv2)


def describe(options: dict) -> str:
    channels = _TRUNKS[options["arch"]][1]
    k = options["num_clusters"]
    v2 = " (VLAD v2)" if options.get("vladv2") else ""
    return f"pytorch-NetVlad {options['arch']} NetVLAD-{k}{v2}, {k * channels}-d"
