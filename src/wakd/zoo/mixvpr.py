"""MixVPR (Ali-bey et al., WACV 2023): Drive ``.ckpt`` files, plain state dicts of ``VPRModel``.

Keys: ``backbone.model.*`` (a torchvision ResNet50 whose avgpool, fc and layer4 are set to
None, so only conv1..layer3 remain) and ``aggregator.mix.{i}.mix.{0,1,3}.*`` (LayerNorm,
Linear, ReLU, Linear over the h*w locations, residual), ``aggregator.channel_proj``,
``aggregator.row_proj``. Published: 4096-d (1024 channels x 4 rows), 512-d, 128-d.
Images are resized to 320x320 (bicubic) and ImageNet-normalised; the aggregator is built for
that feature-map size (20x20 locations), so other input sizes do not fit it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from wakd.zoo.layers import PixelNormalization, resnet, resnet_layout
from wakd.zoo.targets import DistillTargets, activation_targets

NAME = "mixvpr"
IMAGE_SIZE = (320, 320)
RESIZE = "bicubic"
PREFIXES = ("backbone", "aggregator")


class ResNetTrunk(nn.Module):
    """torchvision ResNet with pooling, fc and (optionally) layer4 removed, under ``model``."""

    def __init__(self, depth: int, stages: int) -> None:
        super().__init__()
        self.model = resnet(depth)
        self.model.avgpool = None
        self.model.fc = None
        if stages == 3:
            self.model.layer4 = None

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        x = m.layer3(x)
        return x if m.layer4 is None else m.layer4(x)


class FeatureMixer(nn.Module):
    """x + MLP(LayerNorm(x)) over the flattened locations: [B, C, h*w] -> same."""

    def __init__(self, locations: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.LayerNorm(locations), nn.Linear(locations, hidden), nn.ReLU(), nn.Linear(hidden, locations)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(x)


class MixVPRHead(nn.Module):
    """Feature map [B, C, h, w] -> L2-normalised [B, out_channels * out_rows]."""

    def __init__(self, in_channels: int, locations: int, out_channels: int, out_rows: int, mix_depth: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(*[FeatureMixer(locations, hidden) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(locations, out_rows)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mix(x.flatten(2))  # [B, C, h*w]
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)  # [B, out_channels, h*w]
        return F.normalize(self.row_proj(x).flatten(1), dim=-1)


class MixVPRNet(nn.Module):
    """0-1 RGB [B, 3, H, W] (H, W giving h*w = ``locations``) -> [B, out_channels * out_rows]."""

    def __init__(
        self, depth: int, stages: int, in_channels: int, locations: int, out_channels: int,
        out_rows: int, mix_depth: int, hidden: int,
    ) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        self.backbone = ResNetTrunk(depth, stages)
        self.aggregator = MixVPRHead(in_channels, locations, out_channels, out_rows, mix_depth, hidden)

    def forward(self, images: Tensor) -> Tensor:
        return self.aggregator(self.backbone(self.normalize(images)))

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.backbone(self.normalize(images))
        return activation_targets(features, self.aggregator(features))


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    needed = {"aggregator.channel_proj.weight", "aggregator.row_proj.weight", "aggregator.mix.0.mix.1.weight"}
    if not needed <= state.keys() or any(not k.startswith(("backbone.model.", "aggregator.")) for k in state):
        return None
    layout = resnet_layout(state, [f"backbone.model.layer{i}." for i in range(1, 5)])
    if layout is None:
        return None
    out_channels, in_channels = state["aggregator.channel_proj.weight"].shape
    out_rows, locations = state["aggregator.row_proj.weight"].shape
    mixers = {k.split(".")[2] for k in state if k.startswith("aggregator.mix.")}
    return {
        "depth": layout[0],
        "stages": layout[1],
        "in_channels": int(in_channels),
        "locations": int(locations),
        "out_channels": int(out_channels),
        "out_rows": int(out_rows),
        "mix_depth": len(mixers),
        "hidden": int(state["aggregator.mix.0.mix.1.weight"].shape[0]),
    }


def build(
    depth: int = 50, stages: int = 3, in_channels: int = 1024, locations: int = 400,
    out_channels: int = 1024, out_rows: int = 4, mix_depth: int = 4, hidden: int = 400,
) -> nn.Module:
    return MixVPRNet(depth, stages, in_channels, locations, out_channels, out_rows, mix_depth, hidden)


def describe(options: dict) -> str:
    side = math.isqrt(options["locations"])
    grid = f"{side}x{side}" if side * side == options["locations"] else f"{options['locations']}"
    return (
        f"MixVPR ResNet{options['depth']} (to layer{options['stages']}), "
        f"{options['out_channels'] * options['out_rows']}-d, {grid} feature map"
    )
