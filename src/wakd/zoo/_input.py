"""ImageNet input normalisation for zoo models, kept out of their state dicts.

Published checkpoints carry no normalisation buffers, so a zoo model's ``state_dict``
must not either (strict loading both ways); the statistics are fixed by the family."""

from __future__ import annotations

from wakd.models.normalization import InputNormalization


def imagenet_input() -> InputNormalization:
    """0-1 RGB [B, 3, H, W] -> ImageNet-normalised, with non-persistent buffers."""
    module = InputNormalization()
    for name in ("mean", "std"):
        module.register_buffer(name, getattr(module, name), persistent=False)
    return module
