"""The C allocator's handling of freed memory, for processes that mine tuples.

glibc's malloc serves blocks over its mmap threshold (at most 32 MiB by default) by mmap
and unmaps them when freed, and returns free memory at the top of its heap to the OS past
the trim threshold: every mining round's temporaries (fp32 descriptors, distance blocks,
candidate lists: hundreds of MiB on the demo city) were then faulted in again, page by
page, every round. On 2 cores of a virtual machine that was 0.25 s of a 0.65 s re-ranked
round and 0.15 s of a 0.35 s generation-0 round (bench/RESULTS.md, P6).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks under ``mmap_threshold`` bytes from malloc's heap and keep up to
    ``trim_threshold`` bytes of freed heap in the process, for reuse without page faults.

    The process's peak memory is unchanged; its memory after a peak stays up to
    ``trim_threshold`` higher. Returns False where the C library is not glibc (nothing
    is changed there).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt differs
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
