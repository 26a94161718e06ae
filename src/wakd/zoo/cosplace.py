"""CosPlace (Berton et al., CVPR 2022): torch.hub ``gmberton/cosplace`` ``get_trained_model``.

Release files ``{backbone}_{dim}_cosplace.pth`` are plain state dicts of
``GeoLocalizationNet``: ``backbone.0-7.*`` (a torchvision ResNet without avgpool/fc) or
``backbone.0-28.*`` (VGG16 features without the last ReLU and max-pool), then
``aggregation`` = L2Norm, GeM (``aggregation.1.p``), Flatten, Linear (``aggregation.3``),
L2Norm. Images are ImageNet-normalised and evaluated at full resolution.
EigenPlaces (``wakd.zoo.eigenplaces``) publishes the very same layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from wakd.zoo.layers import (
    RESNET_CHANNELS,
    Flatten,
    GeM,
    L2Norm,
    PixelNormalization,
    resnet_layout,
    resnet_trunk,
    vgg16_trunk,
    vgg16_trunk_present,
)
from wakd.zoo.targets import DistillTargets, activation_targets

NAME = "cosplace"
IMAGE_SIZE = None
PREFIXES = ("backbone", "aggregation")
RESIZE = "none"
TITLE = "CosPlace"
BACKBONES = ("VGG16", "ResNet18", "ResNet50", "ResNet101", "ResNet152")


class GemFcNet(nn.Module):
    """Backbone -> L2 -> GeM -> FC -> L2: 0-1 RGB [B, 3, H, W] -> descriptor [B, fc_output_dim]."""

    def __init__(self, backbone: str, fc_output_dim: int) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        if backbone == "VGG16":
            self.backbone, channels = vgg16_trunk(), 512
        elif backbone.startswith("ResNet") and backbone[6:].isdigit():
            depth = int(backbone[6:])
            self.backbone, channels = resnet_trunk(depth), RESNET_CHANNELS[depth][-1]
        else:
            raise ValueError(f"backbone={backbone!r}: choose one of {', '.join(BACKBONES)}")
        self.aggregation = nn.Sequential(
            L2Norm(), GeM(), Flatten(), nn.Linear(channels, fc_output_dim), L2Norm()
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.aggregation(self.backbone(self.normalize(images)))

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.backbone(self.normalize(images))
        return activation_targets(features, self.aggregation(features))


def detect_gem_fc(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """{backbone, fc_output_dim} of a GeoLocalizationNet state dict, else None."""
    if not {"aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias"} <= state.keys():
        return None
    if any(not k.startswith(("backbone.", "aggregation.")) for k in state):
        return None
    if vgg16_trunk_present(state, "backbone."):
        backbone = "VGG16"
    else:
        layout = resnet_layout(state, [f"backbone.{i}." for i in range(4, 8)])
        if layout is None or layout[1] != 4:
            return None
        backbone = f"ResNet{layout[0]}"
    return {"backbone": backbone, "fc_output_dim": int(state["aggregation.3.weight"].shape[0])}


detect = detect_gem_fc


def build(backbone: str = "ResNet50", fc_output_dim: int = 2048) -> nn.Module:
    return GemFcNet(backbone, fc_output_dim)


def describe(options: dict) -> str:
    return f"{TITLE} {options['backbone']}, {options['fc_output_dim']}-d"
