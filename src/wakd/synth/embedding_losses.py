"""Losses of a global embedding, for place pretraining: multi-positive InfoNCE, CosFace."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosface_logits", "multi_positive_info_nce"]


def multi_positive_info_nce(a: Tensor, b: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between views ``a`` and ``b`` ([B, E], L2-normalised) of places
    ``labels`` [B]; a row's target spreads evenly over all views of its place."""
    logits = a @ b.T / temperature  # [B, B]
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return -(target * (F.log_softmax(logits, 1) + F.log_softmax(logits.T, 1))).sum(1).mean() / 2


def cosface_logits(cosine: Tensor, labels: Tensor, scale: float = 30.0, margin: float = 0.25) -> Tensor:
    """CosFace (large-margin cosine) logits from cosines [B, C] to every class:
    s * (cos(theta_y) - m) for the true class y, s * cos(theta_j) otherwise. The CosFace
    loss is their cross-entropy with ``labels`` [B]."""
    return scale * (cosine - F.one_hot(labels, cosine.shape[1]).to(cosine.dtype) * margin)
