"""Exact top-k nearest-neighbour search over (possibly fp16) descriptor matrices.

The Q x N distance matrix is never materialised: the database and the queries
are walked in chunks, each chunk is converted to fp32 on its own (so fp16
storage keeps the peak memory near the size of the stored descriptors), faiss
returns the top-k of every (query chunk, database chunk) tile, and the
per-tile candidates are merged into the global top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

# (queries [q,D] fp32, database [n,D] fp32, k) -> (squared L2 [q,k] fp32, indices [q,k] int64)
TileSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and torch sees a CUDA device."""
    if not hasattr(faiss, "knn_gpu") or faiss.get_num_gpus() == 0:
        return False
    import torch

    return torch.cuda.is_available()


def _cpu_tile_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Squared L2 of the vectors as stored, not 2 - 2<q,b>: fp16 rounding leaves the
    # norms slightly off 1, and the reported distances must be exact.
    return faiss.knn(xq, xb, k, metric=faiss.METRIC_L2)


def _gpu_tile_search() -> TileSearch:
    """A tile search on GPU 0 that keeps one set of faiss GPU resources across tiles."""
    res = faiss.StandardGpuResources()

    def search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_L2)

    return search


def _merge_topk(
    dist: np.ndarray, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidate lists [q,c] ordered by (distance, index) so ties are deterministic."""
    order = np.lexsort((idx, dist), axis=1)[:, :k]  # [q,k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)


def knn_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    db_chunk: int = 16384,
    q_chunk: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows of every query by squared L2 distance.

    Args:
        database: [N,D] float16 or float32, normally L2-normalised.
        queries: [Q,D] float16 or float32.
        k: neighbours per query; clamped to N.
        db_chunk: database rows converted to fp32 at a time (16384 x 4096-d = 256 MiB).
        q_chunk: query rows converted to fp32 at a time.
        use_gpu: search tiles on a faiss GPU; None picks it when available.

    Returns:
        distances [Q,k] float32 ascending, indices [Q,k] int64; among equal distances
        the lower database index comes first.
    """
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: database {database.shape}, queries {queries.shape}")
    if k < 1 or db_chunk < 1 or q_chunk < 1:
        raise ValueError(f"k, db_chunk and q_chunk must be positive, got {k}, {db_chunk}, {q_chunk}")
    if use_gpu is None:
        use_gpu = gpu_available()
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or no CUDA device is visible")
    tile_search = _gpu_tile_search() if use_gpu else _cpu_tile_search

    num_db, num_q = database.shape[0], queries.shape[0]
    k = min(k, num_db)
    # Running top-k of every query; the inf / -1 placeholders sort after any real hit.
    out_dist = np.full((num_q, k), np.inf, dtype=np.float32)
    out_idx = np.full((num_q, k), -1, dtype=np.int64)

    # fp32 staging buffers, reused so that a new chunk never coexists with the old one.
    dim = database.shape[1]
    xb_buf = np.empty((min(db_chunk, num_db), dim), dtype=np.float32)
    xq_buf = np.empty((min(q_chunk, num_q), dim), dtype=np.float32)

    # Outer loop over the database so each fp32 database chunk is built once;
    # the running top-k of all queries ([Q,k]) is small next to it.
    for d0 in range(0, num_db, db_chunk):
        xb = xb_buf[: min(db_chunk, num_db - d0)]  # [n,D], contiguous leading rows
        xb[:] = database[d0 : d0 + xb.shape[0]]
        kk = min(k, xb.shape[0])
        for q0 in range(0, num_q, q_chunk):
            xq = xq_buf[: min(q_chunk, num_q - q0)]  # [q,D]
            xq[:] = queries[q0 : q0 + xq.shape[0]]
            dist, idx = tile_search(xq, xb, kk)  # [q,kk]
            rows = slice(q0, q0 + xq.shape[0])
            out_dist[rows], out_idx[rows] = _merge_topk(
                np.concatenate([out_dist[rows], dist], axis=1),  # [q,k+kk]
                np.concatenate([out_idx[rows], idx + d0], axis=1),
                k,
            )
    return out_dist, out_idx
