"""EigenPlaces (Berton et al., ICCV 2023): torch.hub ``gmberton/eigenplaces`` ``get_trained_model``.

Release files ``{backbone}_{dim}_eigenplaces.pth`` have CosPlace's layout and network
exactly (``wakd.zoo.cosplace``): L2 -> GeM -> FC -> L2 on a VGG16 / ResNet trunk, full
resolution, ImageNet normalisation. The authors' build first downloads CosPlace weights
into the backbone; this one never downloads (the file overwrites every weight anyway).
"""

from __future__ import annotations

from torch import nn

from wakd.zoo.cosplace import GemFcNet, detect_gem_fc

NAME = "eigenplaces"
IMAGE_SIZE = None
PREFIXES = ("backbone", "aggregation")
RESIZE = "none"
TITLE = "EigenPlaces"

detect = detect_gem_fc


def build(backbone: str = "ResNet50", fc_output_dim: int = 2048) -> nn.Module:
    return GemFcNet(backbone, fc_output_dim)


def describe(options: dict) -> str:
    return f"{TITLE} {options['backbone']}, {options['fc_output_dim']}-d"
