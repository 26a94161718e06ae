"""Small layers and torchvision trunks shared by the published models (``wakd.zoo``).

Every module here holds parameters under the names the authors' files use, and nothing
else: the input normalisation's buffers are not persistent, so a zoo model's
``state_dict()`` is exactly the published layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from wakd.models.normalization import INPUT_NORMS

# Blocks per ResNet stage (layer1..layer4) and whether the blocks are bottlenecks -> depth.
_RESNET_LAYOUTS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_RESNETS = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101, 152: tvm.resnet152}
RESNET_CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512)} | {
    d: (256, 512, 1024, 2048) for d in (50, 101, 152)
}


class PixelNormalization(nn.Module):
    """0-1 pixels [B, 3, H, W] -> ``(x - mean) / std`` with one of wakd's named normalisations
    (``wakd.models.normalization``); buffers are not saved (published files lack them)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        mean, std = INPUT_NORMS[name]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class L2Norm(nn.Module):
    """Unit L2 norm along dim 1 (channels of a map, or a descriptor)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=1)


class GeM(nn.Module):
    """Generalised-mean pooling [B, C, H, W] -> [B, C, 1, 1] with a learnt exponent ``p`` [1]."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # adaptive pooling (not avg_pool2d over x.shape) keeps H and W dynamic in ONNX
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class Flatten(nn.Module):
    """[B, C, 1, 1] -> [B, C]."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, 0, 0]


def vgg16_trunk() -> nn.Sequential:
    """VGG16's conv layers up to conv5_3, without its last ReLU and max-pool (512 channels)."""
    return nn.Sequential(*list(tvm.vgg16(weights=None).features.children())[:-2])


def alexnet_trunk() -> nn.Sequential:
    """AlexNet's conv layers up to conv5, without its last ReLU and max-pool (256 channels)."""
    return nn.Sequential(*list(tvm.alexnet(weights=None).features.children())[:-2])


def resnet(depth: int) -> tvm.ResNet:
    """A randomly initialised torchvision ResNet (never downloads)."""
    if depth not in _RESNETS:
        raise ValueError(f"ResNet{depth}: choose one of {sorted(_RESNETS)}")
    return _RESNETS[depth](weights=None)


def resnet_trunk(depth: int, stages: int = 4) -> nn.Sequential:
    """ResNet children from conv1 to layer{stages} as a Sequential (indices 0-3 stem, 4-7 layers)."""
    return nn.Sequential(*list(resnet(depth).children())[: 4 + stages])


def _block_count(state: Mapping[str, Tensor], prefix: str) -> int:
    blocks = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return sum(1 for b in blocks if b.isdigit())


def resnet_layout(state: Mapping[str, Tensor], stage_prefixes: list[str]) -> tuple[int, int] | None:
    """(depth, stages present) of a ResNet whose stage i's blocks are ``stage_prefixes[i] + 'N.'``.

    Depth follows from blocks per stage and block type; a trunk cut before layer4
    is recognised by its first three stages. None when the keys are no torchvision ResNet.
    """
    counts = [_block_count(state, p) for p in stage_prefixes]
    stages = next((i for i, c in enumerate(counts) if c == 0), len(counts))
    if stages < 3 or any(counts[stages:]):
        return None
    bottleneck = f"{stage_prefixes[0]}0.conv3.weight" in state
    for (blocks, is_bottleneck), depth in _RESNET_LAYOUTS.items():
        if is_bottleneck == bottleneck and blocks[:stages] == tuple(counts[:stages]):
            return depth, stages
    return None


def vgg16_trunk_present(state: Mapping[str, Tensor], prefix: str) -> bool:
    """True when ``prefix`` holds VGG16's 13 conv layers up to conv5_3 (indices 0..28)."""
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    return all(f"{prefix}{i}.weight" in state for i in convs) and f"{prefix}30.weight" not in state


def alexnet_trunk_present(state: Mapping[str, Tensor], prefix: str) -> bool:
    """True when ``prefix`` holds AlexNet's 5 conv layers (indices 0, 3, 6, 8, 10)."""
    return all(f"{prefix}{i}.weight" in state for i in (0, 3, 6, 8, 10)) and f"{prefix}12.weight" not in state
