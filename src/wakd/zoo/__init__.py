"""Published VPR models ("the zoo"): load the authors' weight files strictly, never download.

Each family is a module ``wakd.zoo.<name>`` with ``NAME``, ``IMAGE_SIZE`` ((H, W) its
authors evaluate at, or None for full resolution), ``RESIZE`` ('bilinear' | 'bicubic' |
'none'), ``detect(state) -> options | None``, ``build(**options) -> nn.Module`` (random
weights, the published key layout, 0-1 RGB in, the published descriptor out) and
``describe(options) -> str``; optionally ``prepare(state, options) -> (state, options)``
for options that add tensors from another file (OpenIBL's PCA) and ``PREFIXES``, the
top-level key names its files use (to name the closest family when none recognises a file).
Every family's model also gives ``distill_targets(images)``, what WAKD distils from it
(``wakd.zoo.targets``; :class:`ZooTeacher` wraps a model as a teacher).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from wakd.models.checkpoints import load_torch_file
from wakd.zoo.targets import DistillTargets, ZooTeacher

__all__ = ["FAMILIES", "DistillTargets", "ZooLoadError", "ZooTeacher", "detect", "family_module", "load", "read_state"]

# Registered families, in detection order (CosPlace before EigenPlaces: same layout).
FAMILIES: tuple[str, ...] = (
    "cosplace",
    "eigenplaces",
    "openibl",
    "dvglb",
    "netvlad_pytorch",
    "mixvpr",
    "salad",
    "boq",
    "megaloc",
)
_MAX_LISTED = 8
_WRAPPERS = ("state_dict", "model_state_dict", "model")  # Lightning / OpenIBL, DVGLB, others


class ZooLoadError(ValueError):
    """A weight file that no zoo family (or not the one asked for) can load."""


def family_module(name: str) -> ModuleType:
    """The family module ``wakd.zoo.<name>``; ValueError naming the registered ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"wakd.zoo.{name}")


def _check_local(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise ZooLoadError(
            "no weight file given: pass the published file as model.weights=PATH (teacher.weights=PATH "
            "for a teacher); docs/zoo.md says where each family's files are downloaded"
        )
    text = str(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        name = text.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "the weight file"
        raise ZooLoadError(
            f"weights={text}: wakd never downloads. Download {name} yourself (browser, curl or "
            f"the authors' instructions), put it anywhere on this machine, e.g. "
            f"~/.cache/wakd/zoo/{name}, and pass that path (model.weights=/path/to/{name})"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    return path


def read_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """A published file's tensors: ``.safetensors`` or torch pickles read with weights_only
    (``{'state_dict' | 'model_state_dict' | 'model': ...}`` unwrapped, DataParallel/DDP ``module.`` dropped)."""
    path = _check_local(path)
    try:
        content: object = load_file(str(path)) if path.suffix == ".safetensors" else load_torch_file(path)
    except (SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise ZooLoadError(
            f"{path}: cannot be read as a {'safetensors' if path.suffix == '.safetensors' else 'torch'} "
            f"file (truncated or corrupt download? compare its size with the published one): "
            f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
        ) from None
    for wrapper in _WRAPPERS:
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        found = f" with keys {sorted(map(str, content))[:10]}" if isinstance(content, dict) else ""
        raise ZooLoadError(
            f"{path}: expected a state dict (name -> tensor), or one under 'state_dict' / 'model'; "
            f"found {type(content).__name__}{found}"
        )
    return {re.sub(r"(^|\.)module\.", r"\1", k): v for k, v in content.items()}


def detect(state: Mapping[str, Tensor]) -> list[tuple[ModuleType, dict[str, Any]]]:
    """Every registered family that recognises ``state``, with the options it infers."""
    found = []
    for name in FAMILIES:
        module = family_module(name)
        options = module.detect(state)
        if options is not None:
            found.append((module, options))
    return found


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def key_differences(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``model``, listed."""
    expected = model.state_dict()
    parts = [
        (_listing(title, items) if items else "")
        for title, items in (
            ("missing in file", [k for k in expected if k not in state]),
            ("unexpected in file", [k for k in state if k not in expected]),
            (
                "shape mismatch",
                [
                    f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                    for k, v in state.items()
                    if k in expected and v.shape != expected[k].shape
                ],
            ),
        )
    ]
    return "\n".join(p for p in parts if p)


def _prefixes(state: Mapping[str, Tensor]) -> list[str]:
    return sorted({k.split(".")[0] for k in state})


def _looks_like(state: Mapping[str, Tensor]) -> str:
    matches = detect(state)
    if matches:
        return "; ".join(f"{m.describe(o)}: use model={m.NAME}" for m, o in matches)
    prefixes = ", ".join(f"{p}.*" for p in _prefixes(state)[:10])
    hint = " (a wakd checkpoint: pass it as ckpt=PATH)" if "net" in _prefixes(state) else ""
    return f"no published model this version knows ({len(state)} keys under {prefixes}){hint}"


def _closest(state: Mapping[str, Tensor]) -> ModuleType | None:
    """The first family whose files use all the top-level names of ``state``."""
    names = set(_prefixes(state))
    for name in FAMILIES:
        module = family_module(name)
        if names <= set(getattr(module, "PREFIXES", ())):
            return module
    return None


def _mismatch_error(path: Path, state: Mapping[str, Tensor], module: ModuleType | None, options: dict) -> ZooLoadError:
    message = f"{path}: keys look like {_looks_like(state)}"
    if module is not None:
        try:
            reference = module.build(**options)
            message += (
                f"\n  not loadable as model={module.NAME} ({module.describe(options) if options else 'defaults'}):\n"
                + key_differences(reference, state)
            )
        except (TypeError, ValueError, KeyError) as err:
            message += f"\n  model={module.NAME} with options {options}: {err}"
    return ZooLoadError(message)


def load(path: str | os.PathLike | None, family: str | None = None, **options: Any) -> nn.Module:
    """The published model in ``path``, loaded strictly, in eval mode.

    ``family`` (a config name such as 'cosplace') skips detection; ``options`` override
    what detection infers (and pass file-level options such as OpenIBL's ``pca=PATH``).
    The model gets ``zoo_description`` (what it is, in words).
    """
    path = _check_local(path)
    state = read_state(path)
    if family is not None:
        module = family_module(family)
        detected = module.detect(state)
        if detected is None:
            raise _mismatch_error(path, state, module, options)
    else:
        matches = detect(state)
        if not matches:
            raise _mismatch_error(path, state, _closest(state), options)
        # Families sharing a layout (CosPlace / EigenPlaces): the file name decides, else the first.
        module, detected = next(
            ((m, o) for m, o in matches if m.NAME in path.name.lower()), matches[0]
        )
    options = detected | {k: v for k, v in options.items() if v is not None}
    if hasattr(module, "prepare"):
        state, options = module.prepare(dict(state), options)
    model = module.build(**options)
    # Files saved before torch 1.1 lack BatchNorm's num_batches_tracked (unused in eval).
    state = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")} | state
    differences = key_differences(model, state)
    if differences:
        raise ZooLoadError(
            f"{path}: weights do not fit {module.describe(options)} (model={module.NAME}); "
            f"keys look like {_looks_like(state)}\n{differences}"
        )
    model.load_state_dict(state, strict=True)
    model.zoo_description = module.describe(options)
    return model.eval()
