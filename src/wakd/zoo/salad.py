"""SALAD (Izquierdo & Civera, CVPR 2024): DINOv2 ViT-B/14 + optimal-transport aggregation.

Published as torch.hub ``serizba/salad`` ``dinov2_salad`` / ``dino_salad.ckpt``: a plain
state dict of the Lightning ``VPRModel``, keys ``backbone.model.*`` (DINOv2 hub model, with
``mask_token``) and ``aggregator.{token_features,cluster_features,score,dust_bin}``.
Evaluated at 322 x 322 (bilinear resize, ImageNet normalisation); descriptor
[g | m*l] = 256 + 64 * 128 = 8448, L2-normalised.

``SaladAggregator`` is shared with MegaLoc, whose aggregator is the same computation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wakd.zoo.dinov2 import PATCH, DinoViT, detect_vit, vit_name
from wakd.zoo.layers import PixelNormalization
from wakd.zoo.targets import DistillTargets, transport_map

NAME = "salad"
IMAGE_SIZE: tuple[int, int] | None = (322, 322)
RESIZE = "bilinear"
# Top-level key names of its files (the zoo names the closest family by them).
PREFIXES = ("backbone", "aggregator")

SINKHORN_ITERATIONS = 3


def _sinkhorn_assignment(scores: Tensor, dustbin: Tensor) -> Tensor:
    """Scores [B, m, n] (m clusters, n patches, n > m) -> assignment weights [B, m, n].

    Log-domain Sinkhorn on the scores plus a dustbin row (value ``dustbin``): each patch
    carries mass 1/(n+m); clusters 1/(n+m) each and the dustbin the remaining (n-m)/(n+m).
    The dustbin row is dropped after normalisation, as SALAD does."""
    batch, clusters, patches = scores.shape
    if patches <= clusters:
        raise ValueError(
            f"SALAD needs more patches ({patches}) than clusters ({clusters}): use larger images"
        )
    costs = torch.cat(
        (scores, dustbin.to(scores.dtype).expand(batch, 1, patches)), dim=1
    )  # [B, m+1, n]
    log_mass = -math.log(patches + clusters)
    log_rows = torch.full((clusters + 1,), log_mass, dtype=scores.dtype, device=scores.device)
    log_rows[-1] = log_mass + math.log(patches - clusters)
    log_rows = log_rows.expand(batch, -1)
    log_cols = torch.full((batch, patches), log_mass, dtype=scores.dtype, device=scores.device)
    u, v = torch.zeros_like(log_rows), torch.zeros_like(log_cols)
    for _ in range(SINKHORN_ITERATIONS):
        u = log_rows - torch.logsumexp(costs + v.unsqueeze(1), dim=2)
        v = log_cols - torch.logsumexp(costs + u.unsqueeze(2), dim=1)
    log_plan = costs + u.unsqueeze(2) + v.unsqueeze(1) - log_mass
    return log_plan[:, :-1].exp()


def _two_layer_conv(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    # Index 1 is SALAD's dropout (0.3): it keeps the published indices (0 and 3).
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1),
        nn.Dropout(0.3),
        nn.ReLU(),
        nn.Conv2d(hidden, out_channels, 1),
    )


class SaladAggregator(nn.Module):
    """Patch features [B, C, h, w] and CLS token [B, C] -> [B, token_dim + clusters * cluster_dim],
    L2-normalised: the global token, then per-cluster sums of patch features weighted by
    their Sinkhorn assignment, each cluster L2-normalised (flattened channel-major)."""

    def __init__(
        self, channels: int, clusters: int, cluster_dim: int, token_dim: int, hidden: int
    ) -> None:
        super().__init__()
        self.token_features = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, token_dim)
        )
        self.cluster_features = _two_layer_conv(channels, hidden, cluster_dim)
        self.score = _two_layer_conv(channels, hidden, clusters)
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.cluster_dims = clusters * cluster_dim

    def forward(self, patches: Tensor, cls_token: Tensor) -> Tensor:
        return self.with_assignment(patches, cls_token)[0]

    def with_assignment(self, patches: Tensor, cls_token: Tensor) -> tuple[Tensor, Tensor]:
        """The descriptor and the Sinkhorn assignment [B, m, h*w] it pooled with."""
        features = self.cluster_features(patches).flatten(2)  # [B, l, n]
        weights = _sinkhorn_assignment(self.score(patches).flatten(2), self.dust_bin)  # [B, m, n]
        clusters = F.normalize(torch.einsum("bln,bmn->blm", features, weights), dim=1)  # [B, l, m]
        token = F.normalize(self.token_features(cls_token), dim=-1)
        # reshape to the constant size (not flatten): ONNX exports then know the descriptor size
        flat = clusters.reshape(-1, self.cluster_dims)
        return F.normalize(torch.cat((token, flat), dim=-1), dim=-1), weights


def detect_aggregator(state: Mapping[str, Tensor], prefix: str) -> dict[str, int] | None:
    """Sizes of the SALAD aggregator under ``prefix`` (e.g. 'aggregator.'), or None."""
    names = ("token_features.2.weight", "cluster_features.3.weight", "score.3.weight", "dust_bin")
    if any(f"{prefix}{name}" not in state for name in names):
        return None
    token = state[f"{prefix}token_features.2.weight"]  # [g, hidden]
    return {
        "clusters": int(state[f"{prefix}score.3.weight"].shape[0]),
        "cluster_dim": int(state[f"{prefix}cluster_features.3.weight"].shape[0]),
        "token_dim": int(token.shape[0]),
        "hidden": int(token.shape[1]),
    }


class _Backbone(nn.Module):
    """SALAD's ``backbone`` wrapper: the DINOv2 model sits under ``model``."""

    def __init__(self, vit: DinoViT) -> None:
        super().__init__()
        self.model = vit


class Salad(nn.Module):
    """0-1 RGB [B, 3, H, W] (sides multiples of 14) -> SALAD descriptor [B, D], unit norm."""

    def __init__(self, vit: dict[str, int], aggregator: dict[str, int]) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        self.backbone = _Backbone(DinoViT(**vit, mask_token=True))
        self.aggregator = SaladAggregator(channels=vit["embed_dim"], **aggregator)

    def forward(self, images: Tensor) -> Tensor:
        return self.aggregator(*self._patches_and_token(images))

    def _patches_and_token(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Patch features [B, C, h, w] and CLS token [B, C]."""
        batch, _, height, width = images.shape
        tokens = self.backbone.model.tokens(self.normalize(images))  # [B, 1 + h*w, C]
        patches = (
            tokens[:, 1:].reshape(batch, height // PATCH, width // PATCH, -1).permute(0, 3, 1, 2)
        )
        return patches, tokens[:, 0]

    def distill_targets(self, images: Tensor) -> DistillTargets:
        patches, cls_token = self._patches_and_token(images)
        descriptor, weights = self.aggregator.with_assignment(patches, cls_token)
        return DistillTargets(descriptor, transport_map(weights, *patches.shape[-2:]))


DEFAULTS: dict[str, int] = {
    "embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": 37,
    "clusters": 64, "cluster_dim": 128, "token_dim": 256, "hidden": 512,
}  # fmt: skip


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Build options of a SALAD state dict (``backbone.model.*`` DINOv2 + SALAD aggregator), or None."""
    vit = detect_vit(state, "backbone.model.")
    aggregator = detect_aggregator(state, "aggregator.")
    if vit is None or aggregator is None or "backbone.model.mask_token" not in state:
        return None
    return {**vit, **aggregator}


def build(**options: Any) -> Salad:
    """Random-weight SALAD; options as ``detect`` returns them (defaults: the published model)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"salad: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    vit = {k: int(merged[k]) for k in ("embed_dim", "depth", "num_heads", "pos_grid")}
    aggregator = {k: int(merged[k]) for k in ("clusters", "cluster_dim", "token_dim", "hidden")}
    return Salad(vit, aggregator)


def describe(options: dict) -> str:
    merged = {**DEFAULTS, **options}
    dim = merged["token_dim"] + merged["clusters"] * merged["cluster_dim"]
    return f"SALAD DINOv2 {vit_name(merged['embed_dim'])} (depth {merged['depth']}), {dim}-d"
