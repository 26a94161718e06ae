"""Turns expected failures (missing data, bad files, wrong checkpoints) into one clear message.

Set WAKD_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig

from wakd.data.netvlad_mat import DatasetFormatError

T = TypeVar("T")

# Errors whose message already says what is wrong and how to fix it: no traceback needed.
USER_ERRORS = (FileNotFoundError, DatasetFormatError, ValueError, PermissionError, OSError)


def run_job(job: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    try:
        return job(cfg)
    except USER_ERRORS as exc:
        if os.environ.get("WAKD_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
