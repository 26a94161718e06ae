"""Nearest-neighbour search as the config asks: exact (``wakd.knn``) or an approximate faiss index.

Exact search costs queries x database x D multiply-adds: at a million database images
and ten thousand queries that is 5e12 at 512-d, minutes on a few cores, and grows with
every image. An approximate index visits a small part of the database per query.
``search.index`` is either ``exact`` (the default: :func:`wakd.knn.knn_search`, unchanged)
or any ``faiss.index_factory`` string, e.g. ``IVF4096,Flat`` (inverted lists, vectors in
fp32), ``IVF4096,SQfp16`` (the same with fp16 vectors, half the memory), ``IVF4096,PQ64``
(product-quantised codes, 64 bytes a vector, approximate distances) or ``HNSW32`` (a graph,
no training). The index is trained on ``search.train_size`` database rows drawn with the
run's seed, then filled chunk by chunk: each chunk of the (fp16, possibly memory-mapped)
database is converted to fp32 on its own, so no fp32 copy of the whole database exists
outside the index. ``search.nprobe`` (inverted lists visited per query) and
``search.ef_search`` (HNSW's candidate list) are set through ``faiss.ParameterSpace``
where the index has them and ignored where it does not, so one config serves both kinds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from wakd.knn import knn_search

__all__ = ["EXACT", "SearchSpec", "build_index", "search", "search_index"]

EXACT = "exact"
# fp32 staging of the database (adding) and of the queries (searching): rows per chunk
# such that a chunk is 64 MiB whatever D is.
_CHUNK_BYTES = 64 << 20
_EXAMPLES = '"IVF4096,Flat", "IVF4096,SQfp16", "IVF4096,PQ64", "HNSW32"'


@dataclass(frozen=True)
class SearchSpec:
    """What ``search.*`` asks for; :meth:`from_config` checks every key."""

    index: str = EXACT  # "exact" or a faiss.index_factory string
    train_size: int = 200_000  # database rows the index is trained on (sampled, seeded)
    nprobe: int | None = None  # inverted lists visited per query (IVF indexes)
    ef_search: int | None = None  # HNSW's search-time candidate list
    seed: int = 0  # draws the training sample

    @property
    def exact(self) -> bool:
        return self.index == EXACT

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, seed: int = 0) -> SearchSpec:
        """``cfg``: the ``search`` config group (None = exact). Raises ValueError naming a bad key."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"index", "train_size", "nprobe", "ef_search"})
        if unknown:
            raise ValueError(f"search.{unknown[0]}: unknown key; search takes index, train_size, nprobe, ef_search")
        index = cfg.get("index", EXACT)
        if not isinstance(index, str) or not index.strip():
            raise ValueError(f"search.index={index!r}: give 'exact' or a faiss index_factory string ({_EXAMPLES})")
        values: dict[str, int | None] = {}
        for key, default in (("train_size", cls.train_size), ("nprobe", None), ("ef_search", None)):
            value = cfg.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"search.{key}={value!r}: must be a positive integer" + ("" if key == "train_size" else " or null"))
            values[key] = value
        return cls(index=index.strip(), seed=int(seed), **values)  # type: ignore[arg-type]

    def new_index(self, dim: int) -> faiss.Index:
        """The empty faiss index for ``dim``-d descriptors; a bad factory string fails here, naming the key."""
        if self.exact:
            raise ValueError("search.index=exact has no faiss index: call search() instead")
        try:
            index = faiss.index_factory(dim, self.index)
        except RuntimeError as err:
            raise ValueError(
                f"search.index={self.index!r} is not a faiss index_factory string for {dim}-d descriptors: "
                f"{_faiss_reason(err)} (e.g. {_EXAMPLES}, or exact)"
            ) from None
        self.configure(index)
        return index

    def configure(self, index: faiss.Index) -> None:
        """Set ``nprobe`` / ``efSearch`` on ``index`` where it has them (a built index too)."""
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            if value is not None:
                with contextlib.suppress(RuntimeError):  # this kind of index has no such parameter
                    space.set_index_parameter(index, name, value)


def _faiss_reason(err: RuntimeError) -> str:
    """faiss's message without its C++ location prefix ('Error in <signature> at <file>:<line>: ')."""
    text = str(err).strip().splitlines()[-1]
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)


def _rows_per_chunk(dim: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * dim))


def build_index(database: np.ndarray, spec: SearchSpec) -> faiss.Index:
    """The trained, filled index of ``database`` [N, D] (fp16 or fp32, a memory map is fine).

    Training reads a seeded sample of ``spec.train_size`` rows (all rows when fewer),
    in file order; adding reads the rows chunk by chunk.
    """
    num, dim = database.shape
    index = spec.new_index(dim)
    step = _rows_per_chunk(dim)
    if not index.is_trained:
        size = min(spec.train_size, num)
        chosen = np.sort(np.random.default_rng(spec.seed).choice(num, size=size, replace=False))
        sample = np.empty((size, dim), dtype=np.float32)  # [size, D], filled without an fp16 copy of it
        for a in range(0, size, step):
            sample[a : a + step] = database[chosen[a : a + step]]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(
                f"search.index={spec.index!r} cannot be trained on {size} rows "
                f"(search.train_size={spec.train_size}, database {num}): {_faiss_reason(err)}"
            ) from None
        del sample
    for a in range(0, num, step):
        index.add(np.asarray(database[a : a + step], dtype=np.float32))  # [c, D] fp32, one chunk at a time
    return index


def search(
    database: np.ndarray, queries: np.ndarray, k: int, spec: SearchSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest database rows of every query by squared L2, as ``spec`` says (None = exact).

    Args:
        database: [N, D] float16 or float32, in RAM or memory-mapped (``wakd.store``).
        queries: [Q, D] same.
        k: neighbours per query; clamped to N.

    Returns:
        distances [Q, k] float32 ascending and indices [Q, k] int64. Exact search breaks
        ties by the lower index (``wakd.knn``); an approximate index may miss true
        neighbours, pads with index -1 (distance inf) when it finds fewer than k, and for
        lossy codes (PQ, SQ8) returns distances between codes, not between the vectors.
    """
    if spec is None or spec.exact:
        return knn_search(database, queries, k)
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: database {database.shape}, queries {queries.shape}")
    k = min(k, database.shape[0])
    if k < 1:
        raise ValueError(f"k must be positive and the database non-empty, got k={k}, database {database.shape}")
    return search_index(build_index(database, spec), queries, k)


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a built index (:func:`build_index`) with ``queries`` [Q, D], a chunk at a time.

    Returns distances [Q, k] float32 ascending and indices [Q, k] int64 (-1 and inf where
    the index found fewer than k).
    """
    num_q = queries.shape[0]
    distances = np.empty((num_q, k), dtype=np.float32)
    indices = np.empty((num_q, k), dtype=np.int64)
    step = _rows_per_chunk(queries.shape[1])
    for q0 in range(0, num_q, step):
        xq = np.asarray(queries[q0 : q0 + step], dtype=np.float32)  # [c, D]
        distances[q0 : q0 + len(xq)], indices[q0 : q0 + len(xq)] = index.search(xq, k)
    distances[indices < 0] = np.inf  # faiss pads with the largest float; inf as the exact search's padding
    return distances, indices
