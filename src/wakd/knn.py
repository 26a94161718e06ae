"""Exact nearest neighbours by squared L2 distance, with faiss (on the GPU when it can).

One search serves evaluation (queries against the database, :func:`knn_search`) and
k-reciprocal re-ranking (every training image against all of them, :func:`knn_graph`).
The Q x N distance matrix is never materialised: the database and the queries are walked
in chunks, each chunk is converted to fp32 on its own (so fp16 storage keeps the peak
memory near the size of the stored descriptors), faiss returns the top-k of every
(query chunk, database chunk) tile, and the per-tile candidates are merged into the
global top-k. Ties are broken by the lower database index, so results do not depend on
the chunk sizes or on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
from scipy.linalg.blas import sgemm, ssyrk

__all__ = ["cross_pair_sq_distances", "gpu_available", "knn_graph", "knn_search", "pair_sq_distances"]

# (queries [q,D] fp32, database [n,D] fp32, k) -> (scores [q,k] fp32, indices [q,k] int64)
TileSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# fp32 chunk [n,D] -> the fp32 rows faiss searches [n,D'] (for the farthest-row search)
RowMap = Callable[[np.ndarray], np.ndarray]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and torch sees a CUDA device."""
    # faiss-cpu defines knn_gpu too (it raises); only GPU builds have StandardGpuResources.
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return False
    import torch

    return torch.cuda.is_available()


def _resolve_gpu(use_gpu: bool | None) -> bool:
    """``use_gpu``, None meaning "when available"; True without a GPU raises."""
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or no CUDA device is visible")
    return use_gpu


def _tile_search(use_gpu: bool | None, metric: int) -> TileSearch:
    """faiss's brute-force search of one tile, on the current CUDA device (each DDP rank its own) or the CPU."""
    if not _resolve_gpu(use_gpu):
        return lambda xq, xb, k: faiss.knn(xq, xb, k, metric=metric)
    res = faiss.StandardGpuResources()  # one set of GPU buffers for all tiles of a search
    return lambda xq, xb, k: faiss.knn_gpu(res, xq, xb, k, metric=metric)


def _merge_topk(
    score: np.ndarray, idx: np.ndarray, k: int, largest: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidate lists [q,c] ordered by (score, index) so ties are deterministic."""
    order = np.lexsort((idx, -score if largest else score), axis=1)[:, :k]  # [q,k]
    return np.take_along_axis(score, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _tiled_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    db_chunk: int,
    q_chunk: int,
    use_gpu: bool | None,
    metric: int = faiss.METRIC_L2,
    db_map: RowMap | None = None,
    q_map: RowMap | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The chunked exact search behind both public searches (module docstring)."""
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: database {database.shape}, queries {queries.shape}")
    if k < 1 or db_chunk < 1 or q_chunk < 1:
        raise ValueError(f"k, db_chunk and q_chunk must be positive, got {k}, {db_chunk}, {q_chunk}")
    tile_search = _tile_search(use_gpu, metric)
    largest = metric == faiss.METRIC_INNER_PRODUCT

    num_db, num_q = database.shape[0], queries.shape[0]
    k = min(k, num_db)
    # Running top-k of every query; the placeholders (index -1) sort after any real hit.
    out_score = np.full((num_q, k), -np.inf if largest else np.inf, dtype=np.float32)
    out_idx = np.full((num_q, k), -1, dtype=np.int64)

    # fp32 staging buffers, reused so that a new chunk never coexists with the old one.
    dim = database.shape[1]
    xb_buf = np.empty((min(db_chunk, num_db), dim), dtype=np.float32)
    xq_buf = np.empty((min(q_chunk, num_q), dim), dtype=np.float32)
    # Queries that fit in one chunk (Pitts250k-test's 8,280 do) are converted once, not
    # once per database chunk: numpy's fp16 -> fp32 cast runs on one core.
    xq_all = None
    if num_q <= q_chunk:
        xq_buf[:] = queries
        xq_all = xq_buf if q_map is None else q_map(xq_buf)

    # Outer loop over the database so each fp32 database chunk is built once;
    # the running top-k of all queries ([Q,k]) is small next to it.
    for d0 in range(0, num_db, db_chunk):
        xb = xb_buf[: min(db_chunk, num_db - d0)]  # [n,D], contiguous leading rows
        xb[:] = database[d0 : d0 + xb.shape[0]]
        xb_searched = xb if db_map is None else db_map(xb)
        kk = min(k, xb.shape[0])
        for q0 in range(0, num_q, q_chunk):
            if xq_all is not None:
                xq = xq_searched = xq_all
            else:
                xq = xq_buf[: min(q_chunk, num_q - q0)]  # [q,D]
                xq[:] = queries[q0 : q0 + xq.shape[0]]
                xq_searched = xq if q_map is None else q_map(xq)
            score, idx = tile_search(xq_searched, xb_searched, kk)  # [q,kk]
            rows = slice(q0, q0 + xq.shape[0])
            out_score[rows], out_idx[rows] = _merge_topk(
                np.concatenate([out_score[rows], score], axis=1),  # [q,k+kk]
                np.concatenate([out_idx[rows], idx + d0], axis=1),
                k,
                largest,
            )
    return out_score, out_idx


def knn_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    db_chunk: int = 16384,
    q_chunk: int = 16384,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows of every query by squared L2 distance.

    Args:
        database: [N,D] float16 or float32, normally L2-normalised.
        queries: [Q,D] float16 or float32.
        k: neighbours per query; clamped to N.
        db_chunk: database rows converted to fp32 at a time (16384 x 4096-d = 256 MiB).
        q_chunk: query rows converted to fp32 at a time; up to this many queries are
            converted once for the whole search, more once per database chunk.
        use_gpu: search tiles on a faiss GPU; None picks it when available.

    Returns:
        distances [Q,k] float32 ascending, indices [Q,k] int64; among equal distances
        the lower database index comes first.
    """
    # Squared L2 of the vectors as stored, not 2 - 2<q,b>: fp16 rounding leaves the
    # norms slightly off 1, and the reported distances must be exact.
    return _tiled_search(database, queries, k, db_chunk, q_chunk, use_gpu)


def pair_sq_distances(x: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Squared L2 distances [P] float32 of the row pairs (x[a[p]], x[b[p]]), computed directly."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    out = np.empty(len(a), dtype=np.float32)
    for p0 in range(0, len(a), chunk):
        # Each distinct row converted to fp32 once (numpy's fp16 cast is slow, and
        # re-ranking's pairs repeat every query about pos_pool times), then gathered.
        ends = np.concatenate([a[p0 : p0 + chunk], b[p0 : p0 + chunk]])
        rows, where = np.unique(ends, return_inverse=True)
        x32 = x[rows].astype(np.float32)
        n = len(ends) // 2
        diff = x32[where[:n]] - x32[where[n:]]
        out[p0 : p0 + chunk] = np.einsum("pd,pd->p", diff, diff)
    return out


def cross_pair_sq_distances(
    queries: np.ndarray, database: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """Squared L2 distances [P] float64 of the pairs (queries[rows[p]], database[cols[p]]): a
    mining round's query-to-candidate distances.

    One float64 GEMM of the queries against each database chunk, |q|^2 + |b|^2 - 2 <q, b>
    read off at the pairs: products of fp16 descriptors are exact in float64 and 4,096-term
    sums err by about 1e-13, far below fp32's rounding, so the distances are those of the
    direct per-pair difference (fp32 then) to better than its own precision; at a fraction of
    the time of gathering and differencing a candidate row per pair.
    """
    out = np.empty(len(cols), dtype=np.float64)
    q64 = queries.astype(np.float64)  # [M,D]
    q_norms = np.einsum("md,md->m", q64, q64)
    order = np.argsort(cols, kind="stable")  # pairs by database row, so each chunk is a slice
    bounds = np.searchsorted(cols[order], np.arange(0, len(database) + chunk, chunk))
    for i, d0 in enumerate(range(0, len(database), chunk)):
        sel = order[bounds[i] : bounds[i + 1]]
        if not len(sel):
            continue
        b64 = database[d0 : d0 + chunk].astype(np.float64)  # [c,D]
        gram = q64 @ b64.T  # [M,c]
        r, c = rows[sel], cols[sel] - d0
        out[sel] = q_norms[r] + np.einsum("cd,cd->c", b64, b64)[c] - 2.0 * gram[r, c]
    return np.maximum(out, 0.0, out=out)  # cancellation can leave duplicates at -1e-16


def knn_graph(
    x: np.ndarray,
    k: int,
    *,
    db_chunk: int = 16384,
    q_chunk: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest rows of every row of ``x`` [N, D] (itself included) by squared L2.

    Returns (distances [N, k] ascending, indices [N, k] int64, row maxima [N]: each row's
    largest squared distance to any row). A row's distance to itself is exactly 0 and the
    row is always in its own list.
    """
    n = x.shape[0]
    k = min(k, n)
    own = np.arange(n)
    if _resolve_gpu(use_gpu):
        dist, idx, farthest = _gpu_graph(x, k, db_chunk, q_chunk)
        # The search only picks the farthest row; its distance is computed directly.
        row_max = pair_sq_distances(x, own, farthest)
    else:
        block_rows = min(db_chunk, q_chunk, max(256, 2**25 // x.shape[1]))
        dist, idx, farthest, row_max, sq_norms = _cpu_graph(x, k, block_rows)
        # |a|^2 + |b|^2 - 2 <a, b> loses digits only where it is small next to the norms
        # (near-duplicate data): those rows' maxima are computed directly. Recomputing all
        # of them cost 0.045 s of a 0.7 s mining round on the demo city.
        cancelled = np.flatnonzero(row_max < 0.25 * (sq_norms + sq_norms[farthest]))
        row_max[cancelled] = pair_sq_distances(x, cancelled, farthest[cancelled])
    # faiss computes |a|^2 + |b|^2 - 2<a,b>, so a row's distance to itself is rounding
    # noise that near-duplicates could beat: pin it to 0 and keep the row in its list.
    is_self = idx == own[:, None]
    dist[is_self] = 0.0
    missing = np.flatnonzero(~is_self.any(axis=1))
    dist[missing, -1], idx[missing, -1] = 0.0, missing
    dist, idx = _merge_topk(dist, idx, k)
    return dist, idx, row_max


def _gpu_graph(x: np.ndarray, k: int, db_chunk: int, q_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """knn_graph's k nearest and farthest row of every row, by two searches on the GPU."""
    dist, idx = _tiled_search(x, x, k, db_chunk, q_chunk, True)

    # The farthest row j of i maximises |x_j|^2 - 2<x_i, x_j>, the inner product of
    # [-2 x_i, 1] and [x_j, |x_j|^2]: one more exact search, top-1 by inner product.
    def lift_db(rows: np.ndarray) -> np.ndarray:
        return np.hstack([rows, np.einsum("nd,nd->n", rows, rows)[:, None]])

    def lift_q(rows: np.ndarray) -> np.ndarray:
        return np.hstack([-2.0 * rows, np.ones((len(rows), 1), np.float32)])

    _, farthest = _tiled_search(
        x, x, 1, db_chunk, q_chunk, True, faiss.METRIC_INNER_PRODUCT, lift_db, lift_q
    )
    return dist, idx, farthest[:, 0]


def _cpu_graph(x: np.ndarray, k: int, rows: int) -> tuple[np.ndarray, ...]:
    """knn_graph's k nearest and farthest row of every row on the CPU, in one pass over
    half of the (symmetric) distance matrix, a quarter of the work of two searches.

    Returns (nearest distances [n, k], their indices [n, k], the farthest row [n], its
    distance [n], the squared norms [n]), all distances as faiss's formula computes them.

    Blocks of ``rows`` rows: each distance block (I, J >= I) is one sgemm adding -2 <a, b>
    onto |a|^2 + |b|^2 (faiss's formula, same order of operations; on the diagonal, I = J,
    one syrk of half the multiply-adds, its triangle mirrored: all of the demo city's
    training images are one block) and feeds faiss's heaps
    of rows I and, transposed, of rows J: a max-heap of the k nearest and a min-heap of the
    farthest. Every row sees the column blocks in index order and a heap only takes
    strictly better values, so among equal distances the lower index is kept.
    """
    n = len(x)
    near_d, near_i = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    far_d, far_i = np.empty((n, 1), np.float32), np.empty((n, 1), np.int64)
    near, far = faiss.float_maxheap_array_t(), faiss.float_minheap_array_t()
    for heaps, d, i in ((near, near_d, near_i), (far, far_d, far_i)):
        heaps.k, heaps.nh = d.shape[1], n
        heaps.val, heaps.ids = faiss.swig_ptr(d), faiss.swig_ptr(i)
        heaps.heapify()
    sq_norms = np.empty(n, np.float32)
    buf_a = np.empty((min(rows, n), x.shape[1]), np.float32)
    buf_b = np.empty_like(buf_a)
    block = np.empty(min(rows, n) ** 2, np.float32)
    for i0 in range(0, n, rows):
        xa = buf_a[: min(rows, n - i0)]
        xa[:] = x[i0 : i0 + len(xa)]
        norms_a = sq_norms[i0 : i0 + len(xa)] = np.einsum("nd,nd->n", xa, xa)
        for j0 in range(i0, n, rows):
            xb = xa if j0 == i0 else buf_b[: min(rows, n - j0)]
            if j0 != i0:
                xb[:] = x[j0 : j0 + len(xb)]
            norms_b = norms_a if j0 == i0 else np.einsum("nd,nd->n", xb, xb)
            dist = block[: len(xa) * len(xb)].reshape(len(xa), len(xb))  # C-ordered [a,b]
            np.add(norms_a[:, None], norms_b[None, :], out=dist)
            # BLAS is column-major: dist.T, xb.T and xa.T are Fortran arrays without a
            # copy, and BLAS fills dist.T in place (overwrite_c).
            if j0 == i0:  # a diagonal block is symmetric: syrk does half of sgemm's work
                dist = ssyrk(-2.0, xa.T, beta=1.0, c=dist.T, trans=1, overwrite_c=1).T
                _mirror_lower(dist)
            else:
                dist = sgemm(-2.0, xb.T, xa.T, beta=1.0, trans_a=1, c=dist.T, overwrite_c=1).T
            for heaps in (near, far):
                heaps.addn(len(xb), faiss.swig_ptr(dist), j0, i0, len(xa))
            if j0 != i0:
                dist_t = np.ascontiguousarray(dist.T)  # [b,a]
                for heaps in (near, far):
                    heaps.addn(len(xa), faiss.swig_ptr(dist_t), i0, j0, len(xb))
    return near_d, near_i, far_i[:, 0], far_d[:, 0], sq_norms


def _mirror_lower(square: np.ndarray, stripe: int = 256) -> None:
    """Copy the lower triangle of a C-ordered square matrix onto its upper one, in place,
    stripe by stripe (transposed copies of cache-sized blocks, no index arrays)."""
    n = len(square)
    for r0 in range(0, n, stripe):
        r1 = min(r0 + stripe, n)
        square[r0:r1, r1:] = square[r1:, r0:r1].T
        diagonal = square[r0:r1, r0:r1]
        diagonal[...] = np.tril(diagonal) + np.tril(diagonal, -1).T
