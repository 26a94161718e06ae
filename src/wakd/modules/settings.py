"""The settings of the training modules, grouped as configs/module/*.yaml writes them.

The modules take plain dicts (the hyper-parameters Lightning saves must load with
``weights_only=True``) and read them through these dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# (parameters) -> optimizer and (optimizer) -> scheduler: configs/optimizer, configs/scheduler (_partial_)
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class LossSettings:
    """``hard``: one of ``wakd.losses.HARD_LOSSES`` (``triplet`` takes ``margin``, SARE
    ``tau``, also the soft loss's temperature); ``soft_weight``, ``tau_per_generation``: the
    SFRS soft loss."""

    hard: str = "sare_ind"
    tau: float = 0.07
    margin: float = 0.1**0.5
    soft_weight: float = 0.5
    tau_per_generation: tuple[float, ...] = (0.07, 0.07, 0.06, 0.05)


@dataclass(frozen=True)
class DistillSettings:
    """The distillation terms (:func:`wakd.losses.distill_loss`): their ``weight``, which
    Grams (``vlad``, ``attention``), ``center``ed or not, over each tuple or the whole batch
    (``scope``); and whose descriptors mine the tuples (``mine_with``)."""

    weight: float = 100.0
    vlad: bool = True
    attention: bool = True
    center: bool = False
    scope: str = "tuple"
    mine_with: str = "student"

    def __post_init__(self) -> None:
        if self.scope not in ("tuple", "batch"):
            raise ValueError(f"module.distill.scope={self.scope!r}: choose 'tuple' (the reference's) or 'batch'")
        if self.mine_with not in ("student", "teacher"):
            raise ValueError(f"module.distill.mine_with={self.mine_with!r}: choose 'student', or 'teacher' with a teacher")


@dataclass(frozen=True)
class GenerationSchedule:
    """SFRS generations in passes over the training queries; one round = cache_size queries."""

    generations: int = 4
    first_passes: int = 1  # generation 0 runs only the last epoch of the baseline
    passes: int = 5
    rounds_per_pass: int = 1

    def passes_of(self, generation: int) -> int:
        return self.first_passes if generation == 0 else self.passes

    @property
    def total_rounds(self) -> int:
        return sum(self.passes_of(g) for g in range(self.generations)) * self.rounds_per_pass

    def generation_of(self, round_index: int) -> int:
        end = 0
        for g in range(self.generations):
            end += self.passes_of(g) * self.rounds_per_pass
            if round_index < end:
                return g
        return self.generations - 1
