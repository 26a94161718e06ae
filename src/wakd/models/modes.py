"""Module modes: evaluation for a while (then every submodule's own mode back), or frozen for good."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside the block; afterwards each submodule gets back the mode it
    had. ``net.train(was_training)`` would instead wake submodules kept in eval on purpose
    (frozen BatchNorm, a frozen teacher inside a wrapper)."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for module, training in modes:
            module.training = training


def frozen(net: nn.Module) -> nn.Module:
    """``net`` in eval mode without gradients, for good: a teacher, or the previous SFRS
    generation (its BatchNorm statistics and weights stay as trained)."""
    net.eval()
    net.requires_grad_(False)
    return net
