"""GeM head: generalised-mean pooling with a learnt exponent, an optional linear layer, L2.

For the local features x of one image (C channels over the H x W locations):

    g_c = ( mean_n max(x_nc, eps)^p )^(1/p)      p learnt, shared by all channels
    d   = W g + b (when ``out_dim`` is set)      a linear projection
    d   = d / |d|                                the descriptor, [out_dim or C]

p = 1 is average pooling, p -> inf max pooling (Radenovic et al., TPAMI 2019). The mean is
an adaptive average pool, so an exported graph keeps H and W dynamic. A light alternative
to NetVLAD for students: C-d instead of K x C-d, and no k-means initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wakd.models.netvlad import grid_slices


class GeMHead(nn.Module):
    """Local features [B, dim, H, W] -> global descriptor [B, descriptor_dim], unit L2."""

    def __init__(self, dim: int, out_dim: int | None = None, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"GeM out_dim={out_dim}: give a positive width, or null for no projection")
        self.dim = dim
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.fc = nn.Linear(dim, out_dim) if out_dim is not None else None

    @property
    def descriptor_dim(self) -> int:
        return self.fc.out_features if self.fc is not None else self.dim

    def gem(self, features: Tensor) -> Tensor:
        """Generalised means [B, dim] of the features [B, dim, h, w] (no projection, no L2)."""
        powered = features.clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool2d(powered, 1).flatten(1).pow(1.0 / self.p)

    def forward(self, features: Tensor) -> Tensor:
        pooled = self.gem(features)
        return F.normalize(self.fc(pooled) if self.fc is not None else pooled, dim=1)

    def region_descriptors(self, features: Tensor, grid: int = 3) -> Tensor:
        """SFRS region descriptors [B, 1 + 2*grid, descriptor_dim]: the whole image, each
        row of cells, each column of cells (NetVLAD's regions, ``NetVLAD.region_vlad``),
        each the head applied to that crop of the feature map."""
        height, width = features.shape[-2:]
        if height < grid or width < grid:
            raise ValueError(
                f"feature map {height}x{width} is smaller than the {grid}x{grid} region grid; "
                f"use larger images or a smaller grid"
            )
        rows = [features[..., r, :] for r in grid_slices(height, grid)]
        columns = [features[..., c] for c in grid_slices(width, grid)]
        return torch.stack([self(crop) for crop in (features, *rows, *columns)], dim=1)
