"""Evaluation mode for a while, then every submodule's own mode back."""

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
