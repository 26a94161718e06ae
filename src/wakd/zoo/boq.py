"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024): ResNet50 or DINOv2 ViT-B/14 + learned queries.

Published as torch.hub ``amaralibey/bag-of-queries`` ``get_trained_boq(backbone_name,
output_dim)`` / ``resnet50_16384.pth`` and ``dinov2_12288.pth``: the state dict of hubconf's
``VPRModel``, keys ``backbone.net.{0,1,4,5,6}.*`` (torchvision ResNet conv1, bn1, layer1-3)
or ``backbone.dino.*`` (DINOv2 hub model; its final ``norm`` and ``mask_token`` are stored
but unused), and ``aggregator.{proj_c,norm_input,boqs.N.*,fc}``. The authors' model returns
(descriptor, attentions); this one returns the descriptor. Evaluated at 384 x 384 (ResNet50)
or 322 x 322 (DINOv2), bicubic resize, ImageNet normalisation; descriptor
proj_channels x row_dim (512 x 32 = 16384, 384 x 32 = 12288), L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import models

from wakd.zoo.dinov2 import PATCH, DinoViT, detect_vit, vit_name
from wakd.zoo.layers import PixelNormalization
from wakd.zoo.targets import DistillTargets, attention_weights_map

NAME = "boq"
IMAGE_SIZE: tuple[int, int] | None = (384, 384)  # the hub's default backbone, ResNet50
RESIZE = "bicubic"
# Top-level key names of its files (the zoo names the closest family by them).
PREFIXES = ("backbone", "aggregator")

# Blocks in layer3 and whether they are bottlenecks: how a state dict tells ResNets apart.
RESNET_LAYER3 = {
    "resnet18": (2, False),
    "resnet34": (6, False),
    "resnet50": (6, True),
    "resnet101": (23, True),
    "resnet152": (36, True),
}
# The authors give every attention 64-channel heads (nheads = in_dim // 64).
HEAD_DIM = 64


class BoQBlock(nn.Module):
    """One BoQ layer: a Transformer encoder layer refines the input tokens [B, N, d], then
    learned queries (self-attended, normalised) cross-attend to them -> [B, Q, d]."""

    def __init__(self, dim: int, queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True
        )
        self.queries = nn.Parameter(torch.randn(1, queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Refined tokens, the queries' output and, with ``need_weights``, their
        cross-attention weights [B, Q, N] (averaged over heads)."""
        tokens = self.encoder(tokens)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        queries = self.norm_q(
            queries + self.self_attn(queries, queries, queries, need_weights=False)[0]
        )
        out, weights = self.cross_attn(queries, tokens, tokens, need_weights=need_weights)
        return tokens, self.norm_out(out), weights


class BoQAggregator(nn.Module):
    """Feature map [B, C, h, w] -> descriptor [B, proj_channels * row_dim], L2-normalised."""

    def __init__(
        self, channels: int, proj_channels: int, queries: int, layers: int, row_dim: int, heads: int
    ) -> None:
        super().__init__()
        self.proj_c = nn.Conv2d(channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(BoQBlock(proj_channels, queries, heads) for _ in range(layers))
        self.fc = nn.Linear(layers * queries, row_dim)
        self.dim = proj_channels * row_dim

    def forward(self, features: Tensor) -> Tensor:
        return self.with_attention(features, need_weights=False)[0]

    def with_attention(self, features: Tensor, need_weights: bool = True) -> tuple[Tensor, list[Tensor]]:
        """The descriptor and, with ``need_weights``, each block's cross-attention [B, Q, h*w]."""
        tokens = self.norm_input(self.proj_c(features).flatten(2).transpose(1, 2))  # [B, hw, d]
        outs, weights = [], []
        for block in self.boqs:
            tokens, out, attention = block(tokens, need_weights)
            outs.append(out)
            weights.append(attention)
        rows = self.fc(torch.cat(outs, dim=1).transpose(1, 2))  # [B, d, row_dim]
        # reshape to the constant size (not flatten): ONNX exports then know the descriptor size
        return F.normalize(rows.reshape(-1, self.dim), dim=-1), weights if need_weights else []


class _DinoBackbone(nn.Module):
    """BoQ's DINOv2 wrapper (model under ``dino``): patch tokens without the final norm,
    as a map [B, C, H/14, W/14]."""

    def __init__(self, vit: dict[str, int]) -> None:
        super().__init__()
        self.dino = DinoViT(**vit, mask_token=True)

    def forward(self, images: Tensor) -> Tensor:
        batch, _, height, width = images.shape
        patches = self.dino.tokens(images, final_norm=False)[:, 1:]
        return patches.transpose(1, 2).reshape(batch, -1, height // PATCH, width // PATCH)


class _ResNetBackbone(nn.Module):
    """BoQ's ResNet wrapper: torchvision's ResNet up to layer3 as ``net`` (stride 16)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        resnet = getattr(models, name)(weights=None)
        self.net = nn.Sequential(
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
        )
        self.channels = 1024 if RESNET_LAYER3[name][1] else 256

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class BoQ(nn.Module):
    """0-1 RGB [B, 3, H, W] -> BoQ descriptor [B, D], unit norm."""

    def __init__(self, backbone: nn.Module, channels: int, aggregator: dict[str, int]) -> None:
        super().__init__()
        self.normalize = PixelNormalization("imagenet")
        self.backbone = backbone
        self.aggregator = BoQAggregator(channels, **aggregator)

    def forward(self, images: Tensor) -> Tensor:
        return self.aggregator(self.backbone(self.normalize(images)))

    def distill_targets(self, images: Tensor) -> DistillTargets:
        features = self.backbone(self.normalize(images))
        descriptor, weights = self.aggregator.with_attention(features)
        return DistillTargets(descriptor, attention_weights_map(weights, *features.shape[-2:]))


AGGREGATOR_KEYS = ("proj_channels", "queries", "layers", "row_dim", "heads")
VIT_KEYS = ("embed_dim", "depth", "num_heads", "pos_grid")
DEFAULTS: dict[str, Any] = {"backbone": "resnet50", "queries": 64, "layers": 2, "row_dim": 32}
PUBLISHED_PROJ = {"resnet50": 512, "dinov2": 384}


def _detect_resnet(state: Mapping[str, Tensor]) -> str | None:
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("backbone.net.6.")}
    bottleneck = "backbone.net.6.0.conv3.weight" in state
    for name, layout in RESNET_LAYER3.items():
        if layout == (len(blocks), bottleneck) and blocks == set(range(len(blocks))):
            conv2 = state.get("backbone.net.6.0.conv2.weight")
            if conv2 is not None and conv2.shape[0] == conv2.shape[1]:  # not a grouped ResNeXt
                return name
    return None


def detect(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Build options of a BoQ state dict (ResNet ``backbone.net`` or DINOv2 ``backbone.dino``), or None."""
    if "aggregator.proj_c.weight" not in state or "aggregator.boqs.0.queries" not in state:
        return None
    if any(k.startswith("backbone.dino.") for k in state):
        vit = detect_vit(state, "backbone.dino.")
        if vit is None:
            return None
        options: dict[str, Any] = {"backbone": "dinov2", **vit}
    else:
        resnet = _detect_resnet(state)
        if resnet is None:
            return None
        options = {"backbone": resnet}
    proj = int(state["aggregator.proj_c.weight"].shape[0])
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("aggregator.boqs."))
    return {
        **options,
        "proj_channels": proj,
        "queries": int(state["aggregator.boqs.0.queries"].shape[1]),
        "layers": layers,
        "row_dim": int(state["aggregator.fc.weight"].shape[0]),
        "heads": max(1, proj // HEAD_DIM),
    }


def _complete(options: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**DEFAULTS, **options}
    backbone = merged["backbone"]
    if backbone != "dinov2" and backbone not in RESNET_LAYER3:
        raise ValueError(
            f"boq: backbone={backbone!r}; choose 'dinov2' or one of {sorted(RESNET_LAYER3)}"
        )
    if backbone == "dinov2":
        merged = {"embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": 37, **merged}
    merged.setdefault("proj_channels", PUBLISHED_PROJ.get(backbone, 512))
    merged.setdefault("heads", max(1, merged["proj_channels"] // HEAD_DIM))
    known = {"backbone", *AGGREGATOR_KEYS, *(VIT_KEYS if backbone == "dinov2" else ())}
    unknown = set(merged) - known
    if unknown:
        raise ValueError(
            f"boq ({backbone}): unknown options {sorted(unknown)}; known: {sorted(known)}"
        )
    return merged


def build(**options: Any) -> BoQ:
    """Random-weight BoQ; options as ``detect`` returns them (defaults: the published ResNet50 model,
    or with backbone='dinov2' the published DINOv2 one)."""
    merged = _complete(options)
    aggregator = {k: int(merged[k]) for k in AGGREGATOR_KEYS}
    if merged["backbone"] == "dinov2":
        vit = {k: int(merged[k]) for k in VIT_KEYS}
        return BoQ(_DinoBackbone(vit), vit["embed_dim"], aggregator)
    backbone = _ResNetBackbone(merged["backbone"])
    return BoQ(backbone, backbone.channels, aggregator)


def image_size(options: Mapping[str, Any]) -> tuple[int, int]:
    """The authors' evaluation size: 322 x 322 for DINOv2, 384 x 384 for ResNets."""
    return (322, 322) if options.get("backbone", DEFAULTS["backbone"]) == "dinov2" else (384, 384)


def describe(options: dict) -> str:
    merged = _complete(options)
    if merged["backbone"] == "dinov2":
        backbone = f"DINOv2 {vit_name(merged['embed_dim'])} (depth {merged['depth']})"
    else:
        backbone = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50"}.get(
            merged["backbone"], merged["backbone"]
        )
    return f"BoQ {backbone}, {merged['proj_channels'] * merged['row_dim']}-d"
