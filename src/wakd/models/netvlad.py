"""NetVLAD pooling (Arandjelovic et al., CVPR 2016) and SFRS region descriptors.

For L2-normalised local features x_n (n over the H x W locations) and
centroids c_k, with soft assignment a_k(x_n) = softmax_k(w_k . x_n):

    V_k = sum_n a_k(x_n) (x_n - c_k) = sum_n a_k(x_n) x_n - c_k sum_n a_k(x_n)

then intra-normalisation (each V_k to unit L2), flatten, global L2.
V is additive over locations, which is what the region descriptors use.
"""

from __future__ import annotations

import math
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_slices(size: int, grid: int) -> list[slice]:
    """``grid`` contiguous slices covering range(size), sized as ``torch.tensor_split`` does."""
    return [slice(int(i[0]), int(i[-1]) + 1) for i in torch.arange(size).tensor_split(grid)]


class NetVLAD(nn.Module):
    """Local features [B, D, H, W] -> global descriptor [B, K*D]."""

    def __init__(self, num_clusters: int = 64, dim: int = 512) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.dim = dim
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    @property
    def descriptor_dim(self) -> int:
        return self.num_clusters * self.dim

    def _assign(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-location L2-normalised features x [B, D, H, W] and soft assignments a [B, K, H, W]."""
        x = F.normalize(features, dim=1)
        return x, F.softmax(self.conv(x), dim=1)

    def _aggregate(self, x: Tensor, a: Tensor) -> Tensor:
        """Unnormalised VLAD of all locations of x [B, D, h, w], a [B, K, h, w] -> [B, K, D]."""
        weighted_sum = torch.einsum("bkhw,bdhw->bkd", a, x)
        return weighted_sum - a.sum(dim=(2, 3)).unsqueeze(-1) * self.centroids

    def vlad(self, features: Tensor) -> Tensor:
        """Intra-normalised VLAD [B, K, D] (no global L2): what distillation compares."""
        x, a = self._assign(features)
        return F.normalize(self._aggregate(x, a), dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.vlad(features).flatten(1), dim=1)

    def region_vlad(self, features: Tensor, grid: int = 3) -> Tensor:
        """Intra-normalised VLAD of the SFRS regions [B, 1 + 2*grid, K, D].

        The map is split into grid x grid cells with ``torch.tensor_split``
        boundaries, so H and W need not be divisible by ``grid`` (the first
        H % grid rows of cells are one location taller). Regions: the whole
        image, each row of cells, each column of cells; a region's VLAD is the
        sum of its cells' unnormalised VLADs. One soft-assignment pass serves all.
        """
        height, width = features.shape[-2:]
        if height < grid or width < grid:
            raise ValueError(
                f"feature map {height}x{width} is smaller than the {grid}x{grid} region grid; "
                f"use larger images or a smaller grid"
            )
        x, a = self._assign(features)
        columns = grid_slices(width, grid)
        cells = torch.stack(
            [
                torch.stack([self._aggregate(x[..., r, c], a[..., r, c]) for c in columns], dim=1)
                for r in grid_slices(height, grid)
            ],
            dim=1,
        )  # [B, grid (rows), grid (columns), K, D]
        regions = torch.cat(
            [cells.sum(dim=(1, 2)).unsqueeze(1), cells.sum(dim=2), cells.sum(dim=1)], dim=1
        )
        return F.normalize(regions, dim=-1)

    def region_descriptors(self, features: Tensor, grid: int = 3) -> Tensor:
        """SFRS region descriptors [B, 1 + 2*grid, K*D]: global, rows, columns; each L2."""
        return F.normalize(self.region_vlad(features, grid).flatten(-2), dim=-1)

    @torch.no_grad()
    def init_from_centroids(self, centroids: Tensor, descriptors: Tensor) -> None:
        """Set centroids and the assignment conv from k-means (NetVLAD's initialisation).

        w_k = alpha * c_k / |c_k| with alpha = -ln(0.01) / mean_n(top1_n - top2_n), where
        top1/top2 are the two largest dot products of descriptor n with the normalised
        centroids: the nearest centroid then gets ~100x the weight of the second.
        """
        centroids = torch.as_tensor(centroids, dtype=torch.float64)
        descriptors = torch.as_tensor(descriptors, dtype=torch.float64)
        directions = F.normalize(centroids, dim=1)  # [K, D]
        top2 = (descriptors @ directions.T).topk(2, dim=1).values  # [n, 2]
        alpha = -math.log(0.01) / (top2[:, 0] - top2[:, 1]).mean().item()
        self.centroids.copy_(centroids)
        self.conv.weight.copy_((alpha * directions)[:, :, None, None])

    def init_from_hdf5(self, path: str | os.PathLike) -> None:
        """``init_from_centroids`` from a clustering file (datasets 'centroids', 'descriptors')."""
        with h5py.File(path, "r") as f:
            for key in ("centroids", "descriptors"):
                if key not in f:
                    raise ValueError(
                        f"{path}: no dataset {key!r} (found {sorted(f)}); "
                        f"regenerate it with the clustering step"
                    )
            centroids = np.asarray(f["centroids"])
            descriptors = np.asarray(f["descriptors"])
        k, d = centroids.shape
        if (k, d) != (self.num_clusters, self.dim) or descriptors.shape[1] != self.dim:
            raise ValueError(
                f"{path}: centroids are K={k} x D={d} (descriptors D={descriptors.shape[1]}) "
                f"but the model's NetVLAD is K={self.num_clusters} x D={self.dim}; "
                f"cluster again for this backbone/num_clusters"
            )
        self.init_from_centroids(torch.from_numpy(centroids), torch.from_numpy(descriptors))
