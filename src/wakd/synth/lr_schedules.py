"""Learning-rate schedules built from torch's, for ``configs/scheduler``."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

DECAYS = ("constant", "cosine")


def warmup_then(
    optimizer: Optimizer, *, warmup_steps: int = 0, total_steps: int | None = None, decay: str = "constant"
) -> LRScheduler:
    """Linear warm-up, then constant or a cosine decay, in scheduler steps.

    Step s < ``warmup_steps`` runs at (s + 1) / ``warmup_steps`` of each group's learning
    rate (``LinearLR``); then ``constant`` keeps it, ``cosine`` decays it to 0 at
    ``total_steps`` (``CosineAnnealingLR``), the two chained by ``SequentialLR``.
    """
    if decay not in DECAYS:
        raise ValueError(f"scheduler.decay={decay!r}: choose constant or cosine")
    if decay == "cosine" and not total_steps:
        raise ValueError("scheduler.decay=cosine needs trainer.max_steps > 0")
    if decay == "cosine":
        after: LRScheduler = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return after
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])
