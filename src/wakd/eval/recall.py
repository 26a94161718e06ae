"""Recall@N over ranked retrieval lists, and per-group de-duplication of those lists."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def hit_matrix(topk: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean [Q,K]: True where topk[q, j] is a positive of query q (-1 padding never is).

    Every (query, database) pair becomes one int64 key so a single sorted
    membership test covers all queries at once instead of a Python loop.
    """
    num_q = topk.shape[0]
    if len(positives) != num_q:
        raise ValueError(f"{len(positives)} positive lists for {num_q} queries")
    pos = [np.asarray(p, dtype=np.int64).ravel() for p in positives]
    pos_db = np.concatenate(pos) if pos else np.empty(0, dtype=np.int64)  # [P]
    pos_q = np.repeat(np.arange(num_q, dtype=np.int64), [p.size for p in pos])  # [P]
    stride = int(max(topk.max(initial=-1), pos_db.max(initial=-1))) + 1
    pos_keys = pos_q * stride + pos_db  # [P]
    topk_keys = np.arange(num_q, dtype=np.int64)[:, None] * stride + topk  # [Q,K]
    return np.isin(topk_keys, pos_keys) & (topk >= 0)


def recall_at_n(
    topk: np.ndarray,
    positives: Sequence[np.ndarray],
    ns: Sequence[int] = (1, 5, 10, 20),
) -> dict[int, float]:
    """Fraction of queries with at least one positive among their first n retrievals.

    Args:
        topk: [Q,K] int64 database indices, best first; -1 marks padding.
        positives: Q arrays of database indices within the positive radius. Queries
            without positives stay in the denominator and are never correct.
        ns: the cut-offs N, each in [1, K].

    Returns:
        {n: recall in [0, 1]}.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] == 0:
        raise ValueError(f"topk must be a non-empty [Q,K] array, got shape {topk.shape}")
    bad = [n for n in ns if not 1 <= n <= topk.shape[1]]
    if bad:
        raise ValueError(f"cut-offs {bad} outside [1, {topk.shape[1]}] retrieved per query")
    found = np.logical_or.accumulate(hit_matrix(topk, positives), axis=1)  # [Q,K]
    return {int(n): float(found[:, n - 1].mean()) for n in ns}


def dedup_by_group(
    indices: np.ndarray,
    distances: np.ndarray,
    group_ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the first (best) retrieval of each group, e.g. of each Tokyo 24/7 panorama.

    Args:
        indices: [Q,K'] int64 database indices, best first; -1 is padding.
        distances: [Q,K'] float32 matching distances.
        group_ids: [N] int64 group of every database image.
        k: length of the returned lists.

    Returns:
        indices [Q,k] and distances [Q,k]; rows with fewer than k distinct groups are
        padded with -1 / inf.
    """
    indices = np.asarray(indices, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float32)
    if indices.shape != distances.shape or indices.ndim != 2:
        raise ValueError(f"indices {indices.shape} and distances {distances.shape} differ")
    num_q, width = indices.shape
    valid = indices >= 0  # [Q,K']
    _, dense = np.unique(np.asarray(group_ids, dtype=np.int64), return_inverse=True)  # [N]
    num_groups = int(dense.max(initial=-1)) + 2  # the extra group holds the padding
    groups = np.where(valid, dense[np.where(valid, indices, 0)], num_groups - 1)  # [Q,K']
    keys = (np.arange(num_q, dtype=np.int64)[:, None] * num_groups + groups).ravel()
    # np.unique reports the first flat (row-major) position of each key, i.e. the
    # best-ranked entry of each group within its row.
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(num_q * width, dtype=bool)
    keep[first] = True
    keep = keep.reshape(num_q, width) & valid  # [Q,K']
    # Stable sort moves kept entries to the front without reordering them.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # [Q,min(k,K')]
    kept = np.take_along_axis(keep, order, axis=1)
    out_idx = np.full((num_q, k), -1, dtype=np.int64)
    out_dist = np.full((num_q, k), np.inf, dtype=np.float32)
    cols = order.shape[1]
    out_idx[:, :cols] = np.where(kept, np.take_along_axis(indices, order, axis=1), -1)
    out_dist[:, :cols] = np.where(kept, np.take_along_axis(distances, order, axis=1), np.inf)
    return out_idx, out_dist
