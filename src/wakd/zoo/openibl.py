"""OpenIBL (Ge et al., SFRS, ECCV 2020): VGG16 + NetVLAD, torch.hub ``yxgeee/OpenIBL``.

Two published formats, one network:

* the hub file ``vgg16_netvlad.pth`` (``EmbedNetPCA``): ``base_model.base.{i}.*`` (VGG16
  features without the last ReLU and max-pool), ``net_vlad.conv.weight`` (no bias),
  ``net_vlad.centroids`` [64, 512] and ``pca_layer.weight/bias``, a 1x1 conv 32768 -> 4096
  with the whitening folded in;
* the Drive checkpoints ``{'state_dict', 'epoch', 'best_recall5'}`` saved under DDP
  (``module.`` keys), without the PCA, which sits in ``pca_params_<checkpoint>.h5``
  (datasets U [32768, n], lams [n], mu [32768, 1], Utmu): pass ``pca=PATH`` to add it.

Pixels are normalised as OpenIBL does (0-255 scale minus the mean colour); its test
transform resizes to 480x640. Descriptor: intra-normalised VLAD, L2, then PCA and L2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wakd.models.netvlad import NetVLAD
from wakd.zoo.layers import PixelNormalization, vgg16_trunk, vgg16_trunk_present
from wakd.zoo.targets import DistillTargets, activation_targets

NAME = "openibl"
IMAGE_SIZE = (480, 640)
PREFIXES = ("base_model", "net_vlad", "pca_layer")
RESIZE = "bilinear"
_VGG16_CHANNELS = 512


class OpenIBLNet(nn.Module):
    """0-1 RGB [B, 3, H, W] -> [B, pca_dim] (or [B, num_clusters * 512] without PCA)."""

    def __init__(self, num_clusters: int = 64, pca_dim: int | None = None) -> None:
        super().__init__()
        self.normalize = PixelNormalization("openibl")
        self.base_model = nn.Module()
        self.base_model.base = vgg16_trunk()
        self.net_vlad = NetVLAD(num_clusters, _VGG16_CHANNELS)
        self.pca_layer = (
            nn.Conv2d(num_clusters * _VGG16_CHANNELS, pca_dim, kernel_size=1) if pca_dim else None
        )

    def forward(self, images: Tensor) -> Tensor:
        return self._describe(self.base_model.base(self.normalize(images)))

    def _describe(self, features: Tensor) -> Tensor:
        vlad = self.net_vlad(features)  # [B, K*512], unit L2
        if self.pca_layer is None:
            return vlad
        return F.normalize(self.pca_layer(vlad[:, :, None, None]).flatten(1), dim=1)

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.base_model.base(self.normalize(images))
        return activation_targets(features, self._describe(features))


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    if not {"net_vlad.conv.weight", "net_vlad.centroids"} <= state.keys():
        return None
    if not vgg16_trunk_present(state, "base_model.base."):
        return None
    pca = state.get("pca_layer.weight")
    return {
        "num_clusters": int(state["net_vlad.centroids"].shape[0]),
        "pca_dim": None if pca is None else int(pca.shape[0]),
    }


def read_pca(path: str | os.PathLike, pca_dim: int | None = None, whiten: bool = True) -> dict[str, Tensor]:
    """``pca_layer.weight`` [n, D, 1, 1] and ``pca_layer.bias`` [n] from an OpenIBL
    ``pca_params_*.h5``, computed as OpenIBL's ``PCA.load`` does (first ``pca_dim`` components)."""
    with h5py.File(path, "r") as f:
        missing = [k for k in ("U", "lams", "mu") if k not in f]
        if missing:
            raise ValueError(
                f"{path}: no dataset(s) {missing} (found {sorted(f)}); expected OpenIBL's "
                f"pca_params_<checkpoint>.h5 with U, lams, mu, Utmu"
            )
        u = np.asarray(f["U"])[:, :pca_dim]
        lams = np.asarray(f["lams"])[:pca_dim]
        mu = np.asarray(f["mu"]).reshape(-1, 1)
    if whiten:
        u = u @ np.diag(1.0 / np.sqrt(lams))
    weight = torch.from_numpy(np.ascontiguousarray(u.T)).float()  # [n, D]
    bias = torch.from_numpy(-(u.T @ mu)).float().view(-1)
    return {"pca_layer.weight": weight[:, :, None, None], "pca_layer.bias": bias}


def prepare(state: dict[str, Tensor], options: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """With ``pca=PATH`` (an ``.h5``): the file's PCA becomes ``pca_layer``; options
    ``pca_dim`` (components kept, default all) and ``whiten`` (default true) as OpenIBL's."""
    path = options.pop("pca", None)
    whiten = options.pop("whiten", True)
    if path is None:
        return state, options
    if "pca_layer.weight" in state:
        raise ValueError(f"pca={path}: the checkpoint already holds its PCA (pca_layer); drop pca=")
    pca = read_pca(path, options.get("pca_dim"), whiten)
    expected_in = options["num_clusters"] * _VGG16_CHANNELS
    if pca["pca_layer.weight"].shape[1] != expected_in:
        raise ValueError(
            f"{path}: PCA input is {pca['pca_layer.weight'].shape[1]}-d but this NetVLAD gives "
            f"{expected_in}-d ({options['num_clusters']} x {_VGG16_CHANNELS}); use the PCA file of this checkpoint"
        )
    options["pca_dim"] = int(pca["pca_layer.weight"].shape[0])
    return state | pca, options


def build(num_clusters: int = 64, pca_dim: int | None = None) -> nn.Module:
    return OpenIBLNet(num_clusters, pca_dim)


def describe(options: dict) -> str:
    k = options["num_clusters"]
    dim = options.get("pca_dim") or k * _VGG16_CHANNELS
    pca = "PCA-whitened" if options.get("pca_dim") else "no PCA"
    return f"OpenIBL VGG16 NetVLAD-{k}, {dim}-d ({pca})"
