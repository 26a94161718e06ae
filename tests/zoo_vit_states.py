"""Deterministic synthetic weights for a state-dict layout, shared by tests/test_zoo_vit.py and
bench/zoo_parity_vit.py (which fills the authors' reduced models with them to write the
fixture tests/fixtures/zoo_vit_parity.json): both sides rebuild identical tensors from the
layout (key -> shape, dtype) and a seed, so the fixture needs no weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

# 1-d parameters that scale (LayerNorm/BatchNorm weights, LayerScale) live around 1.
_SCALES = ("weight", "gamma", "running_var", "dust_bin")
_TOKENS = ("cls_token", "mask_token", "pos_embed", "queries")


def synthetic_state(
    layout: Mapping[str, tuple[Sequence[int], str]], seed: int
) -> dict[str, torch.Tensor]:
    """Random tensors for ``layout`` ({key: (shape, dtype name)}), drawn in sorted key order:
    matrices and kernels ~ N(0, 1/fan_in), tokens ~ N(0, 0.25), scales ~ 1 + N(0, 0.01)
    (variances kept positive), the rest ~ N(0, 0.01); integer buffers 0."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(layout):
        shape, dtype = layout[key]
        if not dtype.startswith("float"):
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        noise = torch.randn(shape, generator=generator)
        name = key.rsplit(".", 1)[-1]
        if name in _TOKENS:
            value = 0.5 * noise
        elif len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        elif name in _SCALES:
            value = 1 + 0.1 * noise
            value = value.abs() if name == "running_var" else value
        else:
            value = 0.1 * noise
        state[key] = value
    return state


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[list[int], str]]:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
