"""Place network: backbone -> head (NetVLAD or GeM) -> (PCA whitening) -> global descriptor."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from wakd.models.backbones import Backbone, build_backbone
from wakd.models.checkpoints import load_checked, read_pool_state
from wakd.models.gem import GeMHead
from wakd.models.netvlad import NetVLAD
from wakd.models.normalization import InputNorm
from wakd.models.pca import PCAWhitening


@dataclass
class PlaceOutput:
    """Everything training needs from one pass over a batch of images."""

    features: Tensor  # [B, C, h, w] last feature map (attention distillation)
    vlad: Tensor | None  # [B, K, D] intra-normalised VLAD (VLAD distillation); None: not NetVLAD
    descriptor: Tensor  # [B, D] global L2, before PCA (hard loss); D = K*C for NetVLAD
    regions: Tensor | None  # [B, 1 + 2*grid, D] SFRS regions (soft loss), if asked


# model.net.head -> the pooling layer it builds.
HEADS = ("netvlad", "gem")


class PlaceNet(nn.Module):
    """0-1 pixels [B, 3, H, W] -> place descriptor [B, descriptor_dim].

    The backbone's first layer normalises the pixels as its weights expect
    (``backbone.normalize``), so every path (training, mining, clustering, evaluation,
    a teacher, exports) feeds the same un-normalised images.
    """

    def __init__(
        self, backbone: Backbone, pool: NetVLAD | GeMHead, pca: PCAWhitening | None = None
    ) -> None:
        super().__init__()
        if pool.dim != backbone.out_channels:
            raise ValueError(
                f"{type(pool).__name__} dim={pool.dim} does not match the backbone's "
                f"{backbone.out_channels} output channels"
            )
        self.backbone = backbone
        self.pool = pool
        self.pca = pca
        # True when the head came trained from a weights file: training then starts from it
        # instead of re-clustering (the reference starts each WAKD generation from a
        # trained baseline, NetVLAD included).
        self.pool_from_weights = False

    @property
    def has_netvlad(self) -> bool:
        """Whether the head is NetVLAD: only it has k-means centroids and VLADs to distil."""
        return isinstance(self.pool, NetVLAD)

    @property
    def descriptor_dim(self) -> int:
        return self.pca.out_dim if self.pca is not None else self.pool.descriptor_dim

    def forward(self, images: Tensor) -> Tensor:
        """The deployed descriptor: the one path for extraction, mining, evaluation, export."""
        descriptor = self.pool(self.backbone(images))
        return self.pca(descriptor) if self.pca is not None else descriptor

    def encode(self, images: Tensor, regions: bool = False, grid: int = 3) -> PlaceOutput:
        """Intermediate outputs for training; ``regions`` adds the SFRS region descriptors."""
        features = self.backbone(images)
        if not self.has_netvlad:
            if not regions:
                return PlaceOutput(features, None, self.pool(features), None)
            region_descriptors = self.pool.region_descriptors(features, grid)  # [B, 1 + 2*grid, D]
            return PlaceOutput(features, None, region_descriptors[:, 0], region_descriptors)
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
    input_norm: InputNorm = "imagenet",
    head: str = "netvlad",
    gem_p: float = 3.0,
    gem_dim: int | None = None,
) -> PlaceNet:
    """Backbone ``backbone`` (see ``build_backbone``) + a ``head``: NetVLAD with
    ``num_clusters`` clusters, or GeM (``GeMHead``: initial exponent ``gem_p``, a linear
    layer to ``gem_dim`` unless None).

    ``weights`` may also be a whole trained place network (a wakd training checkpoint, an
    OpenIBL/WAKD one or a ``PlaceNet.state_dict()``): its head is loaded too when it is of
    the same kind (every key of this head in the file); another kind of head (a NetVLAD
    file for a GeM student) leaves this one as initialised.
    """
    if head not in HEADS:
        raise ValueError(f"model.net.head={head!r}: choose one of {HEADS} (python train.py model/head=gem)")
    net = build_backbone(backbone, weights, cut, trainable, proj_dim, bn_momentum, input_norm)
    pool = (
        NetVLAD(num_clusters, net.out_channels)
        if head == "netvlad"
        else GeMHead(net.out_channels, gem_dim, gem_p)
    )
    place_net = PlaceNet(net, pool)
    pool_state = read_pool_state(weights) if weights not in (None, "imagenet") else None
    if pool_state is not None and pool.state_dict().keys() <= pool_state.keys():
        load_checked(place_net.pool, pool_state, weights)
        place_net.pool_from_weights = True
    return place_net
