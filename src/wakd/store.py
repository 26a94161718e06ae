"""Descriptors on disk: an fp16 ``.npy`` file filled batch by batch, read back memory-mapped.

At a million images the descriptor matrix is the largest object of an evaluation (1M x
4,096-d fp16 = 7.6 GiB), and extraction used to hold all of it in RAM, plus a concatenated
copy. A store is written as the batches come: :func:`write_store` opens a ``.npy`` of the
final shape as a memory map under a temporary name beside the target, rows are appended in
order, and only when every row is there is the file flushed and renamed into place
(``wakd.atomic``), so a crash never leaves a store that looks complete. :func:`open_store`
maps it read-only: the search then reads it chunk by chunk and the operating system keeps
as much of it in RAM as it can spare.

Under DDP each rank writes its strided shard (rows r, r + world, ...) to a store of its
own, ``shard_path(target, rank, world)`` beside the target; after a barrier rank 0 weaves
the shards into the target in image order with :func:`interleave_shards`, chunk by chunk,
and deletes them (``wakd.describe.extract_descriptors``). The target folder must be on a
file system that every rank sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from wakd.atomic import atomic_write_path

__all__ = ["StoreWriter", "interleave_shards", "open_store", "shard_path", "write_store"]

STORE_DTYPE = np.float16


class StoreWriter:
    """Appends rows to a store being written; the file is created by the first block.

    The descriptor size is only known once the network has described a batch, so the
    ``.npy`` (header and all ``rows`` rows) is allocated on the first :meth:`append`, or on
    :meth:`close` from ``dim`` when no row came (an empty shard).
    """

    def __init__(self, tmp: Path, rows: int, dim: int | None) -> None:
        self.tmp, self.rows, self.dim = tmp, rows, dim
        self.written = 0
        self._map: np.memmap | None = None

    def _allocate(self, dim: int) -> np.memmap:
        self.dim = dim
        # Sparse on most file systems: disk blocks are taken as rows are written.
        self._map = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=STORE_DTYPE, shape=(self.rows, dim))
        return self._map

    def append(self, block: np.ndarray) -> None:
        """Write ``block`` [b, D] as the next b rows (converted to fp16)."""
        if block.ndim != 2:
            raise ValueError(f"store blocks are [rows, dim] arrays, got shape {block.shape}")
        out = self._map if self._map is not None else self._allocate(block.shape[1])
        if block.shape[1] != out.shape[1] or self.written + len(block) > self.rows:
            raise ValueError(
                f"block {block.shape} does not fit the store [{self.rows}, {out.shape[1]}] "
                f"after {self.written} rows"
            )
        out[self.written : self.written + len(block)] = block
        self.written += len(block)

    def close(self) -> None:
        """Check that every row came, flush and unmap (the rename follows in :func:`write_store`)."""
        if self.written != self.rows:
            raise RuntimeError(f"store incomplete: {self.written} of {self.rows} rows written")
        if self._map is None:
            if self.dim is None:
                raise ValueError("an empty store needs its descriptor size: pass dim")
            self._allocate(self.dim)
        assert self._map is not None
        self._map.flush()
        self._map = None  # unmapped once the last reference goes


@contextlib.contextmanager
def write_store(path: str | os.PathLike, rows: int, dim: int | None = None) -> Iterator[StoreWriter]:
    """A :class:`StoreWriter` for ``rows`` descriptors; ``path`` appears only when all were written.

    On any exception inside the block, or when fewer than ``rows`` rows were appended, the
    temporary file is removed and ``path`` keeps what it held before.
    """
    with atomic_write_path(path) as tmp:
        writer = StoreWriter(tmp, rows, dim)
        yield writer
        writer.close()


def open_store(path: str | os.PathLike) -> np.memmap:
    """The store at ``path`` mapped read-only: [N, D] float16, rows read from disk on access."""
    try:
        store = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"descriptor store {path} not found") from None
    except ValueError as err:
        raise ValueError(f"{path}: not a descriptor store ({err})") from None
    if store.dtype != STORE_DTYPE or store.ndim != 2:
        raise ValueError(f"{path}: a descriptor store holds [N, D] float16, found {store.dtype} {store.shape}")
    return store


def shard_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its shard of the store ``path`` (a hidden name beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.rank{rank}-of-{world}.npy")


def interleave_shards(
    shards: Sequence[str | os.PathLike], total: int, path: str | os.PathLike, chunk: int = 65536
) -> None:
    """Write the store ``path`` [total, D] whose rows r, r + W, ... are shard r's rows (W shards).

    Reads and writes ``chunk`` rows of a shard at a time, so memory stays bounded.
    """
    world = len(shards)
    maps = [open_store(s) for s in shards]
    for r, shard in enumerate(maps):
        if len(shard) != len(range(r, total, world)):
            raise ValueError(f"{shards[r]}: {len(shard)} rows, expected {len(range(r, total, world))} of {total}")
    dims = {m.shape[1] for m in maps if len(m)}
    if len(dims) > 1:
        raise ValueError(f"shards of {path} have different descriptor sizes {sorted(dims)}")
    dim = dims.pop() if dims else maps[0].shape[1]
    with atomic_write_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=(total, dim))
        for r, shard in enumerate(maps):
            for s0 in range(0, len(shard), chunk):
                block = shard[s0 : s0 + chunk]  # [c, D], rows r + (s0 + i) * W of the store
                out[r + s0 * world : r + (s0 + len(block)) * world : world] = block
        out.flush()
        del out
