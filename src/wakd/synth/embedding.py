"""Global embeddings for place pretraining: backbone -> GeM -> FC -> L2, and a cosine classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wakd.models.backbones import Backbone


class GeM(nn.Module):
    """Generalised-mean pooling: (mean x^p)^(1/p), p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # [B, C, h, w] -> [B, C]
        return x.clamp_min(self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class PlaceEmbedding(nn.Module):
    """backbone -> GeM -> FC -> L2: a global descriptor, also used to validate pretraining.

    Keys ``backbone.*``, so that a pretraining checkpoint (``net.backbone.*``) loads as the
    backbone of a place network (``model.weights=<pretraining .ckpt>``).
    """

    def __init__(self, backbone: Backbone, embed_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GeM()
        self.fc = nn.Linear(backbone.out_channels, embed_dim)

    @property
    def descriptor_dim(self) -> int:
        return self.fc.out_features

    def embed(self, features: Tensor) -> Tensor:  # [B, C, h, w] -> [B, E]
        return F.normalize(self.fc(self.pool(features)), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(self.backbone(images))


class CosineClassifier(nn.Module):
    """Cosines between L2-normalised embeddings [B, E] and one learned direction per class
    -> [B, C]; :func:`wakd.losses.cosface_logits` turns them into CosFace's logits."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        # Unit-scale rows: Adam moves each weight by ~lr per step, so tiny rows would be thrashed.
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim))

    def forward(self, embeddings: Tensor) -> Tensor:
        return embeddings @ F.normalize(self.weight, dim=-1).T
