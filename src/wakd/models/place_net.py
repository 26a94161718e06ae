"""Place network: backbone -> NetVLAD -> (PCA whitening) -> global descriptor."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from wakd.models.backbones import Backbone, build_backbone
from wakd.models.netvlad import NetVLAD
from wakd.models.pca import PCAWhitening


@dataclass
class PlaceOutput:
    """Everything training needs from one pass over a batch of images."""

    features: Tensor  # [B, C, h, w] last feature map (attention distillation)
    vlad: Tensor  # [B, K, D] intra-normalised VLAD (VLAD distillation)
    descriptor: Tensor  # [B, K*D] global L2, before PCA (hard loss)
    regions: Tensor | None  # [B, 1 + 2*grid, K*D] SFRS regions (soft loss), if asked


class PlaceNet(nn.Module):
    """images [B, 3, H, W] -> place descriptor [B, descriptor_dim]."""

    def __init__(self, backbone: Backbone, pool: NetVLAD, pca: PCAWhitening | None = None) -> None:
        super().__init__()
        if pool.dim != backbone.out_channels:
            raise ValueError(
                f"NetVLAD dim={pool.dim} does not match the backbone's "
                f"{backbone.out_channels} output channels"
            )
        self.backbone = backbone
        self.pool = pool
        self.pca = pca

    @property
    def descriptor_dim(self) -> int:
        return self.pca.out_dim if self.pca is not None else self.pool.num_clusters * self.pool.dim

    def forward(self, images: Tensor) -> Tensor:
        """The deployed descriptor: the one path for extraction, mining, evaluation, export."""
        descriptor = self.pool(self.backbone(images))
        return self.pca(descriptor) if self.pca is not None else descriptor

    def encode(self, images: Tensor, regions: bool = False, grid: int = 3) -> PlaceOutput:
        """Intermediate outputs for training; ``regions`` adds the SFRS region descriptors."""
        features = self.backbone(images)
        if not regions:
            vlad = self.pool.vlad(features)
            return PlaceOutput(features, vlad, F.normalize(vlad.flatten(1), dim=1), None)
        # Region 0 is the whole image: its VLAD is the image's, so one pooling pass serves both.
        region_vlad = self.pool.region_vlad(features, grid)  # [B, 1 + 2*grid, K, D]
        region_descriptors = F.normalize(region_vlad.flatten(2), dim=2)
        return PlaceOutput(
            features, region_vlad[:, 0], region_descriptors[:, 0], region_descriptors
        )


def build_place_net(
    backbone: str,
    weights: str | os.PathLike | None = None,
    cut: str | None = None,
    trainable: str = "default",
    proj_dim: int | None = None,
    num_clusters: int = 64,
    bn_momentum: float | None = None,
) -> PlaceNet:
    """Backbone ``backbone`` (see ``build_backbone``) + NetVLAD with ``num_clusters`` clusters."""
    net = build_backbone(backbone, weights, cut, trainable, proj_dim, bn_momentum)
    return PlaceNet(net, NetVLAD(num_clusters, net.out_channels))
