"""Hard (tuple) losses of weakly supervised place recognition: triplet, SARE.

Every descriptor is L2-normalised, so s = <a, b> is a cosine similarity.
Shapes: anchor and positive [B, D], negatives [B, N, D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HARD_LOSSES",
    "hard_loss",
    "hardest_regions",
    "sare_ind_loss",
    "sare_joint_loss",
    "triplet_loss",
]


def _similarities(anchor: Tensor, positive: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """s_ap [B] and s_an [B, N]."""
    s_ap = (anchor * positive).sum(-1)  # [B]
    s_an = torch.einsum("bd,bnd->bn", anchor, negatives)  # [B, N]
    return s_ap, s_an


def triplet_loss(
    anchor: Tensor, positive: Tensor, negatives: Tensor, margin: float = 0.1**0.5
) -> Tensor:
    """NetVLAD triplet loss: mean over (b, n) of relu(|a - p| - |a - n_n| + margin).

    Distances are plain (not squared) L2 distances, as in OpenIBL's
    ``F.triplet_margin_loss(p=2)``.
    """
    d_ap = torch.linalg.vector_norm(anchor - positive, dim=-1)  # [B]
    d_an = torch.linalg.vector_norm(anchor.unsqueeze(1) - negatives, dim=-1)  # [B, N]
    return F.relu(d_ap.unsqueeze(1) - d_an + margin).mean()


def sare_ind_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, tau: float = 0.07) -> Tensor:
    """SARE, individual: mean over (b, n) of -log softmax([s_ap, s_an] / tau)[0]."""
    s_ap, s_an = _similarities(anchor, positive, negatives)
    logits = torch.stack([s_ap.unsqueeze(1).expand_as(s_an), s_an], dim=-1) / tau  # [B, N, 2]
    return -F.log_softmax(logits, dim=-1)[..., 0].mean()


def sare_joint_loss(
    anchor: Tensor, positive: Tensor, negatives: Tensor, tau: float = 0.07
) -> Tensor:
    """SARE, joint: mean over b of -log softmax([s_ap, s_a1, ..., s_aN] / tau)[0]."""
    s_ap, s_an = _similarities(anchor, positive, negatives)
    logits = torch.cat([s_ap.unsqueeze(1), s_an], dim=1) / tau  # [B, 1 + N]
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


HARD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "triplet": triplet_loss,
    "sare_ind": sare_ind_loss,
    "sare_joint": sare_joint_loss,
}


def hard_loss(
    name: str, anchor: Tensor, positive: Tensor, negatives: Tensor, **kwargs: float
) -> Tensor:
    """Dispatch to ``HARD_LOSSES[name]``; keyword arguments (margin, tau) pass through."""
    try:
        loss_fn = HARD_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown hard loss {name!r}; choose one of {sorted(HARD_LOSSES)}"
        ) from None
    return loss_fn(anchor, positive, negatives, **kwargs)


def hardest_regions(anchor: Tensor, negative_regions: Tensor) -> Tensor:
    """SFRS (generation >= 1): represent each negative by its region most similar to the anchor.

    anchor [B, D], negative_regions [B, N, R, D] -> [B, N, D]. The choice is a
    discrete argmax; gradients flow into the selected region descriptors only.
    """
    with torch.no_grad():
        scores = torch.einsum("bd,bnrd->bnr", anchor, negative_regions)  # [B, N, R]
        best = scores.argmax(dim=-1)  # [B, N]
    index = best[..., None, None].expand(-1, -1, 1, negative_regions.shape[-1])  # [B, N, 1, D]
    return negative_regions.gather(2, index).squeeze(2)
