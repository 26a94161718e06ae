"""Reading weight files safely and loading them into wakd models.

Every file is read with ``torch.load(..., weights_only=True)`` or safetensors, so
a malicious pickle is refused instead of executed.

``load_place_net_weights`` understands three layouts:

* wakd Lightning checkpoints: ``{'state_dict': {'net.backbone.*', 'net.pool.*',
  'net.pca.*', 'teacher.*', ...}}``; only ``net.*`` is used, other prefixes
  (teacher, previous generation, losses) are ignored;
* OpenIBL / WAKD checkpoints: ``{'state_dict': {'module.base_model.*',
  'module.net_vlad.*'}}``. Mapping: an optional ``module.`` prefix is dropped,
  ``base_model.base.<i>`` -> ``backbone.features.<i>`` (OpenIBL's VGG16 keeps
  ``vgg16().features[:29]`` under ``base``, exactly our ``features``),
  any other ``base_model.<rest>`` -> ``backbone.<rest>``, and
  ``net_vlad.{conv.weight,centroids}`` -> ``pool.{conv.weight,centroids}``;
* a plain ``PlaceNet.state_dict()``;
* OpenIBL's VGG16 start, the MatConvNet VGG16 of NetVLAD's authors converted to a bare
  ``vgg16().features`` state dict (``logs/vd16_offtheshelf_conv5_3_max.pth``, keys
  ``0.weight`` ... ``28.bias``): -> ``backbone.features.<i>``, with OpenIBL's input
  normalisation (the MatConvNet one those filters were trained with).

Input normalisation (``wakd.models.normalization``): wakd checkpoints carry it as the
buffers ``backbone.normalize.{mean,std}``. OpenIBL/WAKD checkpoints do not store it,
but their trainer fed every image through the MatConvNet-style ``Normalize`` of
OpenIBL (0-255 pixels minus the mean colour): the mapping adds those buffers
(``'openibl'``), so such a network describes 0-1 pixels exactly as the reference
does. wakd checkpoints older than the buffers lack them: ``load_checked`` lets
these two keys be missing and the model keeps the normalisation it was built with
(``input_norm``, default ImageNet: what all of them were trained with).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from wakd.models.normalization import input_norm_state

StateDict = dict[str, Tensor]

_MAX_LISTED = 20
# A bare VGG16 ``features`` state dict: OpenIBL's MatConvNet start (module docstring).
_MATCONVNET_VGG_KEY = re.compile(r"^\d+\.(weight|bias)$")

# Keys of the input normalisation, in a PlaceNet's and in a Backbone's state dict.
INPUT_NORM_KEYS = frozenset(
    f"{prefix}normalize.{name}" for prefix in ("backbone.", "") for name in ("mean", "std")
)


def load_torch_file(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)``: pickled code is refused (ValueError), never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refusing to load, the file contains pickled objects other than "
            f"tensors (weights_only=True); nothing in it was executed. Re-save it as a plain "
            f"state dict (torch.save(model.state_dict(), f)) or as .safetensors. "
            f"Detail: {_unpickling_detail(err)}"
        ) from None


def _unpickling_detail(err: Exception) -> str:
    """The one informative sentence of torch's long weights_only error (never its 'load anyway' advice)."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(\s|$)", str(err))
    if match:
        return match.group(1)
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors of a weight file: the ``state_dict`` entry when present, ``module.`` stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        content: object = load_file(str(path))
    else:
        content = load_torch_file(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor) or a checkpoint with a "
            f"'state_dict' entry, found {type(content).__name__}"
            + (f" with keys {sorted(content)[:10]}" if isinstance(content, dict) else "")
        )
    return {k.removeprefix("module."): v for k, v in content.items()}


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def load_checked(
    module: nn.Module,
    state: StateDict,
    source: str | os.PathLike,
    may_miss: Callable[[str], bool] = lambda key: False,
    ignore_unexpected: bool = False,
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key -> one ValueError.

    ``may_miss(key)`` marks model keys the file need not provide (e.g. a new
    projection layer); BatchNorm's ``num_batches_tracked`` counters (old torchvision
    files lack them) and the input normalisation (``INPUT_NORM_KEYS``: wakd files from
    before it was stored, ImageNet classifier files) may always be missing, and the
    module then keeps its own.
    """
    expected = module.state_dict()
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and k not in INPUT_NORM_KEYS
        and not may_miss(k)
    ]
    unexpected = [] if ignore_unexpected else [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(title, items)
            for title, items in (
                ("shape mismatch", mismatched),
                ("missing in file", missing),
                ("unexpected in file", unexpected),
            )
            if items
        ]
        raise ValueError(
            f"{source}: weights do not fit this {type(module).__name__} "
            f"(another architecture, cut, projection or NetVLAD size?)\n" + "\n".join(parts)
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _openibl_to_wakd(key: str) -> str:
    if key.startswith("base_model.base."):
        return "backbone.features." + key.removeprefix("base_model.base.")
    if key.startswith("base_model."):
        return "backbone." + key.removeprefix("base_model.")
    return "pool." + key.removeprefix("net_vlad.")


def place_net_state(state: StateDict) -> StateDict:
    """Translate any supported checkpoint layout (module docstring) to PlaceNet key names."""
    if any(k.startswith("net.") for k in state):
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if any(k.startswith(("base_model.", "net_vlad.")) for k in state):
        mapped = {
            _openibl_to_wakd(k): v
            for k, v in state.items()
            if k.startswith(("base_model.", "net_vlad."))
        }
        if any(k.startswith("backbone.") for k in mapped):  # the pixels its backbone learnt on
            mapped |= {f"backbone.normalize.{k}": v for k, v in input_norm_state("openibl").items()}
        return mapped
    if state and all(_MATCONVNET_VGG_KEY.match(k) for k in state):
        mapped = {f"backbone.features.{k}": v for k, v in state.items()}
        return mapped | {f"backbone.normalize.{k}": v for k, v in input_norm_state("openibl").items()}
    return state


def read_pool_state(path: str | os.PathLike) -> StateDict | None:
    """The head (``pool.*``: NetVLAD's ``conv.weight``, ``centroids``; GeM's ``p``,
    ``fc.*``) of a whole trained place network in any supported layout, or None when the
    file holds a backbone only (ImageNet). A pretraining checkpoint's is its GeM ``p``."""
    state = place_net_state(read_state_dict(path))
    pool = {k.removeprefix("pool."): v for k, v in state.items() if k.startswith("pool.")}
    return pool or None


def load_place_net_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a wakd Lightning, OpenIBL/WAKD or plain PlaceNet checkpoint into ``net`` (a PlaceNet)."""
    load_checked(net, place_net_state(read_state_dict(path)), path)
