"""Turns expected failures (missing data, bad files, wrong checkpoints) into one clear message.

Set WAKD_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from wakd.data.datasets import NO_DATA_HINT, MissingDatasetError
from wakd.data.netvlad_mat import DatasetFormatError

T = TypeVar("T")

# Errors whose message already says what is wrong and how to fix it: no traceback needed.
USER_ERRORS = (FileNotFoundError, DatasetFormatError, ValueError, PermissionError, OSError)

# A DataLoader worker re-raises its error with the worker's traceback in the message.
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def user_message(exc: BaseException) -> str:
    """The one-line(ish) message shown for an expected error."""
    if isinstance(exc, pickle.UnpicklingError):
        # torch.load(weights_only=True) inside Lightning (ckpt_path=...) met pickled code.
        return (
            "refusing to load a checkpoint that contains pickled objects other than tensors "
            "(weights_only=True); nothing in it was executed. Only load checkpoints you made "
            "or re-save the weights as a plain state dict / .safetensors."
        )
    text = str(exc)
    if _WORKER_TRACEBACK.match(text):
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # drop 'module.ErrorClass: '
    return text


def _expected_cause(exc: BaseException) -> BaseException | None:
    """The expected error behind ``exc``: itself, or what hydra.utils.instantiate wrapped."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__  # e.g. model.weights=FILE failing inside build_place_net
    return exc if isinstance(exc, (*USER_ERRORS, pickle.UnpicklingError)) else None


def no_data_hint(exc: BaseException, cfg: DictConfig) -> str:
    """The synthetic-city suggestion for missing data, only where no data location was named.

    A root given as ``dataset.root=`` or ``paths.data_dir=`` replaces the configs'
    interpolations: that user wants that data, and is told only what is missing in it.
    """
    if not isinstance(exc, MissingDatasetError) or "dataset" not in cfg:
        return ""
    default_location = OmegaConf.is_interpolation(cfg.dataset, "root") and OmegaConf.is_interpolation(
        cfg.paths, "data_dir"
    )
    return f"\n{NO_DATA_HINT}" if default_location else ""


def run_job(job: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    try:
        return job(cfg)
    except (*USER_ERRORS, pickle.UnpicklingError, InstantiationException) as exc:
        cause = _expected_cause(exc)
        if cause is None or os.environ.get("WAKD_DEBUG"):
            raise
        print(f"error: {user_message(cause)}{no_data_hint(cause, cfg)}", file=sys.stderr)
        sys.exit(2)
