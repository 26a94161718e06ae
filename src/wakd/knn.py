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
from typing import NamedTuple

import faiss
import numpy as np
from scipy.linalg.blas import sgemm

__all__ = [
    "KnnGraph",
    "cross_pair_sq_distances",
    "formula_error_bound",
    "gpu_available",
    "k_smallest_per_list",
    "knn_graph",
    "knn_search",
    "pair_sq_distances",
]

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

    # Outer loop over the database so each fp32 database chunk is built once;
    # the running top-k of all queries ([Q,k]) is small next to it.
    for d0 in range(0, num_db, db_chunk):
        xb = xb_buf[: min(db_chunk, num_db - d0)]  # [n,D], contiguous leading rows
        xb[:] = database[d0 : d0 + xb.shape[0]]
        xb_searched = xb if db_map is None else db_map(xb)
        kk = min(k, xb.shape[0])
        for q0 in range(0, num_q, q_chunk):
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
    q_chunk: int = 4096,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows of every query by squared L2 distance.

    Args:
        database: [N,D] float16 or float32, normally L2-normalised.
        queries: [Q,D] float16 or float32.
        k: neighbours per query; clamped to N.
        db_chunk: database rows converted to fp32 at a time (16384 x 4096-d = 256 MiB).
        q_chunk: query rows converted to fp32 at a time (once per database chunk).
        use_gpu: search tiles on a faiss GPU; None picks it when available.

    Returns:
        distances [Q,k] float32 ascending, indices [Q,k] int64; among equal distances
        the lower database index comes first.
    """
    # Squared L2 of the vectors as stored, not 2 - 2<q,b>: fp16 rounding leaves the
    # norms slightly off 1, and the reported distances must be exact.
    return _tiled_search(database, queries, k, db_chunk, q_chunk, use_gpu)


def pair_sq_distances(
    x: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096, dtype: type = np.float32
) -> np.ndarray:
    """Squared L2 distances [P] of the row pairs (x[a[p]], x[b[p]]), computed directly in
    ``dtype`` (float64: exact to its rounding for fp16 or fp32 rows)."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    out = np.empty(len(a), dtype=dtype)
    for p0 in range(0, len(a), chunk):
        ends = np.concatenate([a[p0 : p0 + chunk], b[p0 : p0 + chunk]])
        n = len(ends) // 2
        if x.dtype == np.float16:
            # numpy's fp16 cast is slow and re-ranking's pairs repeat every query about
            # pos_pool times: each distinct row converted once, then gathered.
            rows, where = np.unique(ends, return_inverse=True)
            converted = x[rows].astype(dtype)
            diff = converted[where[:n]] - converted[where[n:]]
        else:
            diff = x[ends[:n]].astype(dtype, copy=False) - x[ends[n:]]
        out[p0 : p0 + chunk] = np.einsum("pd,pd->p", diff, diff)
    return out


def formula_error_bound(dim: int, sq_norm_sum: float) -> float:
    """A bound on the error of |a|^2 + |b|^2 - 2 <a, b> computed in fp32 from rows whose
    values fp32 holds exactly (fp16 or fp32), with |a|^2 + |b|^2 <= ``sq_norm_sum``.

    The two norms and the product are sums of ``dim`` terms (each within gamma_dim times
    the sum of the terms' magnitudes, in any order of summation, with or without FMA) and
    2 |<a, b>| <= |a|^2 + |b|^2: the error is at most (2 gamma_dim + 3u) (|a|^2 + |b|^2),
    u = 2^-24; 3 gamma_(dim + 2) covers it with room for the rounding of the bound itself.
    """
    unit = 2.0**-24
    gamma = (dim + 2) * unit / (1.0 - (dim + 2) * unit)
    return 3.0 * gamma * float(sq_norm_sum)


def cross_pair_sq_distances(
    queries: np.ndarray, database: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """Squared L2 distances [P] float32 of the pairs (queries[rows[p]], database[cols[p]]),
    by |q|^2 + |b|^2 - 2 <q, b> in fp32: within :func:`formula_error_bound` of the exact ones.

    One sgemm of the queries against each database chunk, read off at the pairs: a mining
    round's query-to-candidate distances at a fraction of the time of gathering and
    differencing a candidate row per pair. A float64 GEMM (exact to far below fp32's
    rounding) took twice as long; the miner re-scores exactly only the pairs whose order
    the bound leaves in doubt (:func:`k_smallest_per_list`).
    """
    out = np.empty(len(cols), dtype=np.float32)
    q32 = queries.astype(np.float32, copy=False)  # [M,D]
    q_norms = np.einsum("md,md->m", q32, q32)
    order, bounds = _group_by(cols // chunk, -(-len(database) // chunk))  # each chunk's pairs
    for i, d0 in enumerate(range(0, len(database), chunk)):
        sel = order[bounds[i] : bounds[i + 1]]
        if not len(sel):
            continue
        b32 = database[d0 : d0 + chunk].astype(np.float32, copy=False)  # [c,D]
        gram = q32 @ b32.T  # [M,c]
        r, c = rows[sel], cols[sel] - d0
        out[sel] = q_norms[r] + np.einsum("cd,cd->c", b32, b32)[c] - 2.0 * gram[r, c]
    return out


def k_smallest_per_list(
    approx: np.ndarray,
    bound: float,
    lengths: np.ndarray,
    k: int,
    exact: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances of every list, in the order the exact distances give
    (among equal ones the earlier position first), from approximate ones.

    ``approx`` [P]: the lists' distances concatenated (list i has ``lengths[i]``), each
    within ``bound`` of its exact value; ``exact(positions)`` gives the exact distances
    [len(positions)] float64 of those positions. Only pairs within 2 ``bound`` of a
    neighbour in approximate order, among those that could be in a list's k smallest,
    are re-scored: elsewhere the approximate order is the exact one.

    Returns (positions into ``approx`` of each list's min(k, length) smallest, list by
    list and nearest first; their distances [S] float64, exact where re-scored).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(approx):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    starts = np.cumsum(lengths) - lengths
    group = np.repeat(np.arange(len(lengths)), lengths)  # [P] list of each position
    approx = np.asarray(approx, dtype=np.float32)
    # Each list's k-th smallest approximate value (lists as rows padded with inf).
    width = int(lengths.max())
    padded = np.full((len(lengths), width), np.inf, dtype=np.float32)
    padded[group, np.arange(len(approx)) - starts[group]] = approx
    kth = np.partition(padded, min(k, width) - 1, axis=1)[:, min(k, width) - 1]
    # A position whose value exceeds the k-th by more than 2 bound has k exactly smaller
    # ones; the limit is rounded up into fp32, so the fp32 comparison keeps all the others.
    limit = np.nextafter((kth.astype(np.float64) + 2.0 * bound).astype(np.float32), np.float32(np.inf))
    order = np.flatnonzero(approx <= limit[group])
    values = approx[order].astype(np.float64)
    by_value = np.lexsort((values, group[order]))  # by list, then value; stable
    order, values = order[by_value], values[by_value]
    close = (group[order[1:]] == group[order[:-1]]) & (np.diff(values) <= 2.0 * bound)
    doubt = np.zeros(len(order), dtype=bool)
    doubt[1:] |= close
    doubt[:-1] |= close
    values[doubt] = exact(order[doubt])
    resort = np.lexsort((order, values, group[order]))
    order, values = order[resort], values[resort]
    listed = group[order]
    rank = np.arange(len(order)) - np.searchsorted(listed, listed)  # place within its list
    keep = rank < k
    return order[keep], values[keep]


class KnnGraph(NamedTuple):
    """:func:`knn_graph`'s result."""

    distances: np.ndarray  # [N, k] float32 ascending
    indices: np.ndarray  # [N, k] int64
    row_max: np.ndarray  # [N] float32: each row's largest squared distance to any row
    pair_distances: np.ndarray | None  # [P] float32 of the requested pairs (cross_pair_sq_distances's precision)


def knn_graph(
    x: np.ndarray,
    k: int,
    *,
    db_chunk: int = 16384,
    q_chunk: int = 4096,
    use_gpu: bool | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> KnnGraph:
    """The k nearest rows of every row of ``x`` [N, D] (itself included) by squared L2.

    Returns a :class:`KnnGraph`: distances [N, k] ascending, indices [N, k] int64, each
    row's largest squared distance to any row, and for ``pairs`` (a [P], b [P]) the
    distances of the rows (x[a[p]], x[b[p]]) by the norm formula in fp32 (read off the
    CPU pass, which computes them all anyway: a mining round's query-candidate pairs).
    A row's distance to itself is exactly 0 and the row is always in its own list.
    """
    n = x.shape[0]
    k = min(k, n)
    own = np.arange(n)
    pair_distances = None
    if _resolve_gpu(use_gpu):
        dist, idx, farthest = _gpu_graph(x, k, db_chunk, q_chunk)
        # The search only picks the farthest row; its distance is computed directly.
        row_max = pair_sq_distances(x, own, farthest)
        if pairs is not None:
            firsts, rows = np.unique(pairs[0], return_inverse=True)
            pair_distances = cross_pair_sq_distances(x[firsts], x, rows, np.asarray(pairs[1]))
    else:
        block_rows = min(db_chunk, q_chunk, max(256, 2**25 // x.shape[1]))
        dist, idx, farthest, row_max, sq_norms, pair_distances = _cpu_graph(x, k, block_rows, pairs)
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
    return KnnGraph(dist, idx, row_max, pair_distances)


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


def _cpu_graph(
    x: np.ndarray, k: int, rows: int, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, ...]:
    """knn_graph's k nearest and farthest row of every row on the CPU, in one pass over
    half of the (symmetric) distance matrix, a quarter of the work of two searches.

    Returns (nearest distances [n, k], their indices [n, k], the farthest row [n], its
    distance [n], the squared norms [n], the distances [P] of ``pairs`` or None), all
    distances as faiss's formula computes them.

    Blocks of ``rows`` rows: each distance block (I, J >= I) is one sgemm adding -2 <a, b>
    onto |a|^2 + |b|^2 (faiss's formula, same order of operations) and feeds faiss's heaps
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
    # Row blocks: views of fp32 rows (no copy), else converted into two reused buffers.
    as_is = x.dtype == np.float32 and x.flags.c_contiguous
    buffers = [None, None] if as_is else [np.empty((min(rows, n), x.shape[1]), np.float32) for _ in range(2)]

    def fp32_rows(start: int, which: int) -> np.ndarray:
        if as_is:
            return x[start : start + rows]
        out = buffers[which][: min(rows, n - start)]
        out[:] = x[start : start + len(out)]
        return out

    block = np.empty(min(rows, n) ** 2, np.float32)
    pair_d = None
    if pairs is not None:  # each pair (lower row, higher row) lies in one block (I, J >= I)
        lower, upper = np.minimum(*pairs), np.maximum(*pairs)
        blocks = -(-n // rows)
        by_block, block_starts = _group_by((lower // rows) * blocks + upper // rows, blocks * blocks)
        pair_d = np.empty(len(lower), np.float32)
    for i0 in range(0, n, rows):
        xa = fp32_rows(i0, 0)
        norms_a = sq_norms[i0 : i0 + len(xa)] = np.einsum("nd,nd->n", xa, xa)
        for j0 in range(i0, n, rows):
            xb = xa if j0 == i0 else fp32_rows(j0, 1)
            norms_b = norms_a if j0 == i0 else np.einsum("nd,nd->n", xb, xb)
            dist = block[: len(xa) * len(xb)].reshape(len(xa), len(xb))  # C-ordered [a,b]
            np.add(norms_a[:, None], norms_b[None, :], out=dist)
            # BLAS is column-major: dist.T, xb.T and xa.T are Fortran arrays without a
            # copy, and BLAS fills dist.T in place (overwrite_c).
            dist = sgemm(-2.0, xb.T, xa.T, beta=1.0, trans_a=1, c=dist.T, overwrite_c=1).T
            for heaps in (near, far):
                heaps.addn(len(xb), faiss.swig_ptr(dist), j0, i0, len(xa))
            if pair_d is not None:
                b_id = (i0 // rows) * blocks + j0 // rows
                sel = by_block[block_starts[b_id] : block_starts[b_id + 1]]
                pair_d[sel] = dist[lower[sel] - i0, upper[sel] - j0]
            if j0 != i0:
                dist_t = np.ascontiguousarray(dist.T)  # [b,a]
                for heaps in (near, far):
                    heaps.addn(len(xa), faiss.swig_ptr(dist_t), i0, j0, len(xb))
    return near_d, near_i, far_i[:, 0], far_d[:, 0], sq_norms, pair_d


def _group_by(labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``labels`` [P] (in 0..num_labels-1) grouped by label, and where each
    label's group starts [num_labels + 1]: group g is order[starts[g] : starts[g + 1]]."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(num_labels + 1))
