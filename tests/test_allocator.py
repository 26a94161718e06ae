"""retain_freed_memory: a freed block stays in the process, for reuse without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import os, sys
import numpy as np
from wakd.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = np.ones(48 << 20, dtype=np.uint8)  # 48 MiB: over glibc's default mmap threshold
before = resident()
del block
print(before - resident())
"""


def _released_on_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_process() -> None:
    assert _released_on_free("default") >= 40 << 20  # unmapped on free: faulted in again next time
    assert _released_on_free("retain") < 4 << 20
