"""MegaLoc (Berton & Masone, CVPR-W 2025): ViT-B/14 + SALAD-style aggregation + linear.

Published as torch.hub ``gmberton/MegaLoc`` ``get_trained_model`` / ``model.safetensors``
(Hugging Face ``gberton/MegaLoc``): keys ``backbone.{cls_token,pos_embed,patch_embed.proj,
blocks.N.*,norm}`` (the authors' own DINOv2-compatible ViT, no ``mask_token``),
``aggregator.agg.{token_features,cluster_features,score,dust_bin}`` (SALAD's aggregator with
64 clusters of 256 channels) and ``aggregator.linear`` (16640 -> 8448). The authors' model
resizes images whose sides are not multiples of 14 to the nearest multiples (bilinear,
antialiased) inside ``forward``; it is evaluated at full resolution, ImageNet-normalised.
Descriptor 8448-d, L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from wakd.zoo.dinov2 import PATCH, DinoViT, detect_vit, vit_name
from wakd.zoo.layers import PixelNormalization
from wakd.zoo.salad import SaladAggregator, detect_aggregator
from wakd.zoo.targets import DistillTargets, transport_map

NAME = "megaloc"
IMAGE_SIZE: tuple[int, int] | None = None
RESIZE = "none"
# Top-level key names of its files (the zoo names the closest family by them).
PREFIXES = ("backbone", "aggregator")


class _Aggregator(nn.Module):
    """MegaLoc's aggregator: SALAD's (under ``agg``), then a linear projection."""

    def __init__(self, channels: int, feat_dim: int, aggregator: dict[str, int]) -> None:
        super().__init__()
        self.agg = SaladAggregator(channels, **aggregator)
        self.linear = nn.Linear(
            aggregator["token_dim"] + aggregator["clusters"] * aggregator["cluster_dim"], feat_dim
        )

    def forward(self, patches: Tensor, cls_token: Tensor) -> Tensor:
        return self.with_assignment(patches, cls_token)[0]

    def with_assignment(self, patches: Tensor, cls_token: Tensor) -> tuple[Tensor, Tensor]:
        """The projected descriptor (before the final L2) and SALAD's assignment [B, m, h*w]."""
        descriptor, weights = self.agg.with_assignment(patches, cls_token)
        return self.linear(descriptor), weights


class MegaLoc(nn.Module):
    """0-1 RGB [B, 3, H, W], any size -> MegaLoc descriptor [B, feat_dim], unit norm."""

    def __init__(self, vit: dict[str, int], feat_dim: int, aggregator: dict[str, int]) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        self.backbone = DinoViT(**vit, mask_token=False)
        self.aggregator = _Aggregator(vit["embed_dim"], feat_dim, aggregator)

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.aggregator(*self._patches_and_token(images)), dim=-1)

    def _patches_and_token(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Patch features [B, C, h, w] and CLS token [B, C] of images of any size."""
        images = self.normalize(images)
        height, width = images.shape[-2:]
        if height % PATCH or width % PATCH:
            # As the authors' forward does, on normalised images: nearest multiples of 14.
            height, width = round(height / PATCH) * PATCH, round(width / PATCH) * PATCH
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True)
        tokens = self.backbone.tokens(images)  # [B, 1 + h*w, C]
        patches = (
            tokens[:, 1:]
            .reshape(images.shape[0], height // PATCH, width // PATCH, -1)
            .permute(0, 3, 1, 2)
        )
        return patches, tokens[:, 0]

    def distill_targets(self, images: Tensor) -> DistillTargets:
        patches, cls_token = self._patches_and_token(images)
        descriptor, weights = self.aggregator.with_assignment(patches, cls_token)
        return DistillTargets(F.normalize(descriptor, dim=-1), transport_map(weights, *patches.shape[-2:]))


DEFAULTS: dict[str, int] = {
    "embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": 37,
    "clusters": 64, "cluster_dim": 256, "token_dim": 256, "hidden": 512, "feat_dim": 8448,
}  # fmt: skip


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Build options of a MegaLoc state dict (``backbone.*`` ViT, ``aggregator.agg`` + ``aggregator.linear``), or None."""
    vit = detect_vit(state, "backbone.")
    aggregator = detect_aggregator(state, "aggregator.agg.")
    linear = state.get("aggregator.linear.weight")
    if vit is None or aggregator is None or linear is None or "backbone.mask_token" in state:
        return None
    return {**vit, **aggregator, "feat_dim": int(linear.shape[0])}


def build(**options: Any) -> MegaLoc:
    """Random-weight MegaLoc; options as ``detect`` returns them (defaults: the published model)."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"megaloc: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    merged = {k: int(v) for k, v in {**DEFAULTS, **options}.items()}
    vit = {k: merged[k] for k in ("embed_dim", "depth", "num_heads", "pos_grid")}
    aggregator = {k: merged[k] for k in ("clusters", "cluster_dim", "token_dim", "hidden")}
    return MegaLoc(vit, merged["feat_dim"], aggregator)


def describe(options: dict) -> str:
    merged = {**DEFAULTS, **options}
    return (
        f"MegaLoc {vit_name(merged['embed_dim'])} (depth {merged['depth']}), {merged['feat_dim']}-d"
    )
