"""SFRS soft loss: region similarities of the previous generation as soft labels.

Used from generation 1 on (weight 0.5 in the paper's script).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TAU_PER_GENERATION", "sfrs_soft_loss"]

#: Temperature of the previous generation's soft labels, indexed by generation.
TAU_PER_GENERATION: tuple[float, ...] = (0.07, 0.07, 0.06, 0.05)


def _region_similarities(anchor: Tensor, positive_regions: Tensor) -> Tensor:
    """anchor [B, D], positive_regions [B, P, R, D] -> [B, P * R] dot products."""
    return torch.einsum("bd,bprd->bpr", anchor, positive_regions).flatten(1)


def sfrs_soft_loss(
    anchor: Tensor,
    positive_regions: Tensor,
    prev_anchor: Tensor,
    prev_positive_regions: Tensor,
    tau_prev: float,
    tau: float = 0.07,
) -> Tensor:
    """Cross-entropy between previous-generation and current anchor-to-region similarities.

    L = mean_b  -sum_j q_bj log p_bj, with
    q = softmax(sim_prev / tau_prev) (a fixed target: no gradient to the previous model),
    p = softmax(sim / tau), over the P * R anchor-to-region similarities of each tuple.
    """
    with torch.no_grad():
        target = F.softmax(_region_similarities(prev_anchor, prev_positive_regions) / tau_prev, 1)
    log_p = F.log_softmax(_region_similarities(anchor, positive_regions) / tau, dim=1)  # [B, P*R]
    return -(target * log_p).sum(1).mean()
