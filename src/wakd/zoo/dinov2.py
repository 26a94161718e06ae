"""DINOv2 ViT/14 backbone as a timm ``VisionTransformer``, in DINOv2's published key layout.

timm's ``vit_*_patch14_dinov2`` blocks already carry DINOv2's parameter names
(``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``norm``). Two things differ and are
fixed here:

* the hub model has an (inference-unused) ``mask_token`` [1, C]; SALAD and BoQ checkpoints
  keep it, MegaLoc's own ViT has none, so it is optional;
* DINOv2 resizes its position embedding with ``interpolate(scale_factor=(h0 + 0.1) / M, ...)``
  (a historical offset), not to an output size as timm does: the sampling points differ, so
  the descriptors would too. ``tokens`` reproduces DINOv2's way.

This module is a building block of the SALAD, BoQ and MegaLoc families, not a family itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

PATCH = 14
# Every DINOv2 size (S/B/L/g) uses 64-channel attention heads; state dicts do not record heads.
HEAD_DIM = 64
# DINOv2's position-embedding resize offset (dinov2/models/vision_transformer.py, interpolate_offset).
POS_OFFSET = 0.1


class DinoViT(VisionTransformer):
    """DINOv2 ViT/14 (timm architecture) whose ``state_dict`` matches DINOv2's hub model.

    ``pos_grid`` is the side M of the stored M x M position-embedding grid (37 for the
    published 518 x 518 models)."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        pos_grid: int = 37,
        mask_token: bool = True,
    ) -> None:
        super().__init__(
            img_size=pos_grid * PATCH,
            patch_size=PATCH,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=True,
        )
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """[1, 1 + rows * cols, C]: the stored embedding resized as DINOv2 resizes it."""
        # Plain ints even while an ONNX export traces (shapes are tensors then): the resized
        # embedding becomes a constant of the export size, the one size such a graph serves.
        rows, cols = int(rows), int(cols)
        grid = self.pos_embed.shape[1] - 1
        side = math.isqrt(grid)
        if grid == rows * cols and rows == cols:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        patches = self.pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        scale = ((rows + POS_OFFSET) / side, (cols + POS_OFFSET) / side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat((self.pos_embed[:, :1].float(), patches), dim=1).to(self.pos_embed.dtype)

    def tokens(self, images: Tensor, final_norm: bool = True) -> Tensor:
        """Normalised images [B, 3, H, W] (H, W multiples of 14) -> tokens [B, 1 + HW/196, C],
        CLS first; ``final_norm`` applies the last LayerNorm (BoQ skips it)."""
        height, width = images.shape[-2:]
        if height % PATCH or width % PATCH:
            raise ValueError(
                f"DINOv2 needs image sides that are multiples of {PATCH}, got {height}x{width}: "
                "resize the images first (the zoo's image_size does)"
            )
        x = self.patch_embed(images).flatten(1, 2)  # [B, h*w, C] (timm's dynamic size gives NHWC)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.position_embedding(height // PATCH, width // PATCH)
        x = self.blocks(x)
        return self.norm(x) if final_norm else x


def detect_vit(state: Mapping[str, Tensor], prefix: str) -> dict[str, int] | None:
    """ViT options (embed_dim, depth, num_heads, pos_grid) of the DINOv2 weights under
    ``prefix`` in ``state``, or None when there are none (or they are not an MLP ViT/14)."""
    patch = state.get(f"{prefix}patch_embed.proj.weight")
    pos = state.get(f"{prefix}pos_embed")
    if patch is None or pos is None or tuple(patch.shape[1:]) != (3, PATCH, PATCH):
        return None
    if f"{prefix}blocks.0.mlp.fc1.weight" not in state:  # ViT-g's SwiGLU is not supported
        return None
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        return None
    depth = 1 + max(
        int(k[len(prefix) :].split(".")[1]) for k in state if k.startswith(f"{prefix}blocks.")
    )
    embed_dim = int(patch.shape[0])
    return {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": max(1, embed_dim // HEAD_DIM),
        "pos_grid": side,
    }


def vit_name(embed_dim: int) -> str:
    """DINOv2's name for a ViT/14 width, e.g. 'ViT-B/14'; reduced widths are named by their width."""
    return {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14"}.get(
        embed_dim, f"ViT-{embed_dim}/14"
    )
