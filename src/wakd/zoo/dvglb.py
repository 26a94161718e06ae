"""Deep visual geo-localization benchmark (Berton et al., CVPR 2022): Drive files, no hub.

``GeoLocalizationNet`` state dicts (``module.`` stripped): ``backbone.{i}.*`` is a torchvision
ResNet18/50/101 cut after conv4 (layer3, indices 0-6) or conv5 (layer4, 0-7), or VGG16
features without the last ReLU and max-pool (0-28); ``aggregation`` is NetVLAD
(``aggregation.centroids``, ``aggregation.conv.weight``, no bias) or GeM with the L2 before
pooling (``aggregation.1.p``); with ``--fc_output_dim`` it is wrapped as
``Sequential(aggregation, Linear, L2Norm)`` (``aggregation.0.*``, ``aggregation.1.*``).
ImageNet normalisation; evaluated at 480x640 (``--resize``, bilinear).
As in the authors' code, GeM without an FC layer is *not* L2-normalised after pooling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from wakd.models.netvlad import NetVLAD
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

NAME = "dvglb"
IMAGE_SIZE = (480, 640)
RESIZE = "bilinear"
PREFIXES = ("backbone", "aggregation")
AGGREGATIONS = ("netvlad", "gem")


def _trunk(backbone: str) -> tuple[nn.Sequential, int]:
    """The named trunk ('vgg16', 'resnet50conv4', ...) and its output channels."""
    if backbone == "vgg16":
        return vgg16_trunk(), 512
    if backbone.startswith("resnet") and backbone.endswith(("conv4", "conv5")):
        depth, stages = int(backbone[6:-5]), int(backbone[-1])
        return resnet_trunk(depth, stages - 1), RESNET_CHANNELS[depth][stages - 2]
    raise ValueError(f"backbone={backbone!r}: choose vgg16 or resnet{{18,50,101}}conv{{4,5}}")


class DvglbNet(nn.Module):
    """0-1 RGB [B, 3, H, W] -> [B, num_clusters * C] (NetVLAD), [B, C] (GeM) or [B, fc_output_dim]."""

    def __init__(
        self, backbone: str, aggregation: str, num_clusters: int = 64, fc_output_dim: int | None = None
    ) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        self.backbone, channels = _trunk(backbone)
        if aggregation == "netvlad":
            pool: nn.Module = NetVLAD(num_clusters, channels)
            pooled = num_clusters * channels
        elif aggregation == "gem":
            pool, pooled = nn.Sequential(L2Norm(), GeM(), Flatten()), channels
        else:
            raise ValueError(f"aggregation={aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        if fc_output_dim:
            pool = nn.Sequential(pool, nn.Linear(pooled, fc_output_dim), L2Norm())
        self.aggregation = pool

    def forward(self, images: Tensor) -> Tensor:
        return self.aggregation(self.backbone(self.normalize(images)))

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.backbone(self.normalize(images))
        return activation_targets(features, self.aggregation(features))


def _backbone(state: Mapping[str, Tensor]) -> str | None:
    if vgg16_trunk_present(state, "backbone."):
        return "vgg16"
    layout = resnet_layout(state, [f"backbone.{i}." for i in range(4, 8)])
    return None if layout is None else f"resnet{layout[0]}conv{layout[1] + 1}"


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    if any(not k.startswith(("backbone.", "aggregation.")) for k in state):
        return None
    aggregation_keys = {k for k in state if k.startswith("aggregation.")}
    has_fc = "aggregation.1.weight" in state and "aggregation.1.bias" in state
    inner = "aggregation.0." if has_fc else "aggregation."
    fc_keys = {"aggregation.1.weight", "aggregation.1.bias"} if has_fc else set()
    options: dict[str, Any]
    if aggregation_keys == {f"{inner}centroids", f"{inner}conv.weight"} | fc_keys:
        options = {"aggregation": "netvlad", "num_clusters": int(state[f"{inner}centroids"].shape[0])}
    elif aggregation_keys == {f"{inner}1.p"} | fc_keys:
        options = {"aggregation": "gem"}
    else:
        return None
    backbone = _backbone(state)
    if backbone is None:
        return None
    options["backbone"] = backbone
    options["fc_output_dim"] = int(state["aggregation.1.weight"].shape[0]) if has_fc else None
    return options


def build(
    backbone: str = "resnet50conv4", aggregation: str = "netvlad", num_clusters: int = 64,
    fc_output_dim: int | None = None,
) -> nn.Module:
    return DvglbNet(backbone, aggregation, num_clusters, fc_output_dim)


def describe(options: dict) -> str:
    head = f"NetVLAD-{options.get('num_clusters', 64)}" if options["aggregation"] == "netvlad" else "GeM"
    fc = f" + FC {options['fc_output_dim']}-d" if options.get("fc_output_dim") else ""
    return f"DVGLB {options['backbone']} {head}{fc}"
