"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of chosen pairs of descriptors.

SFRS/OpenIBL re-rank each training query's candidate positives by this distance from
generation 1 on. The algorithm, on the set X of all training queries and database
images with squared L2 distances d:

1. d(i, .) is divided by its row maximum (over all of X).
2. N(i, k): the k + 1 nearest rows of i (i itself included); R(i, k): the members j of
   N(i, k) with i in N(j, k) (k-reciprocal neighbours).
3. R*(i) = R(i, k1), extended by R(c, round(k1 / 2)) for every c in R(i, k1) of which more
   than 2/3 already lie in R(i, k1).
4. V_i = exp(-d(i, j)) over j in R*(i), zero elsewhere, divided by its sum.
5. Local query expansion: V_i <- mean of V_j over the k2 nearest rows j of i (k2 = 1: none).
6. Jaccard distance d_J(i, j) = 1 - sum_k min(V_ik, V_jk) / sum_k max(V_ik, V_jk)
   (= 1 - s / (2 - s) with s the sum of minima, as both rows sum to 1).
7. Final distance (1 - lambda) d_J + lambda d.

Only the (k1 + 1)-nearest-neighbour lists of X are kept (exact, by faiss in chunks,
:func:`wakd.knn.knn_graph`: O(|X|^2 D) time, O(|X| k1) memory; no |X| x |X| matrix is
ever stored or sorted), and V only for the rows the requested pairs need. On
Pitts30k-train (17.4k x 32k-d) finding the neighbours and each row's farthest row (for
step 1) is ~20 T multiply-adds per mining round on a GPU (two searches), ~5 T on the CPU
(one pass over half of the symmetric distances): seconds on a GPU, minutes on 2 CPU cores.

Differences to OpenIBL's ``re_ranking`` (which builds and argsorts the full matrix): that
one squares the distances it is given and OpenIBL gives it squared distances already, so
its d is the 4th power of the L2 distance; here d is the squared L2 distance, as in
Zhong et al.'s own code. The defaults here are OpenIBL's SFRS settings (k1=20, k2=1,
lambda=0.1, as ``configs/datamodule/tuples.yaml``); Zhong et al.'s paper uses k1=20, k2=6,
lambda=0.3.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from wakd.knn import KnnGraph, gpu_available, knn_graph, pair_sq_distances

__all__ = ["k_reciprocal_distances", "reranking_graph"]


def _any_last_axis(equal: np.ndarray) -> np.ndarray:
    """``equal.any(-1)`` from the positions of its True entries: numpy's ``any`` over a
    last axis of ~20 was a third of the k-reciprocal sets' time on the demo city."""
    out = np.zeros(equal.shape[:-1], dtype=bool)
    out.reshape(-1)[np.flatnonzero(equal) // equal.shape[-1]] = True
    return out


def _reciprocal_mask(nn: np.ndarray, rows: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """[len(rows), k + 1] bool: is ``rows[r]`` among the k + 1 nearest of its neighbour nn[rows[r], a]?"""
    out = np.empty((len(rows), k + 1), dtype=bool)
    for r0 in range(0, len(rows), chunk):
        r = rows[r0 : r0 + chunk]
        back = nn[nn[r, : k + 1], : k + 1]  # [R, k+1, k+1]
        out[r0 : r0 + chunk] = _any_last_axis(back == r[:, None, None])
    return out


def _k_reciprocal_weights(
    x: np.ndarray,
    nn: np.ndarray,
    nn_dist: np.ndarray,
    row_max: np.ndarray,
    rows: np.ndarray,
    k1: int,
    chunk: int = 1024,
) -> sp.csr_matrix:
    """V of steps 3-4 for ``rows`` (other rows empty), as a sparse [N, N] matrix."""
    n = nn.shape[0]
    half = int(np.around(k1 / 2.0))
    members_all, rows_all = [], []
    for r0 in range(0, len(rows), chunk):
        r = rows[r0 : r0 + chunk]
        fwd = nn[r, : k1 + 1]  # [R, k1+1]
        recip = _reciprocal_mask(nn, r, k1)
        own = np.where(recip, fwd, -1)  # R(i, k1), -1 = not a member
        # Candidates c in R(i, k1) and their own R(c, half).
        cand_half = nn[fwd, : half + 1]  # [R, k1+1, half+1]
        cand_recip = _reciprocal_mask(nn, fwd.reshape(-1), half).reshape(*fwd.shape, half + 1)
        cand_set = np.where(cand_recip, cand_half, -1)
        inside = _any_last_axis(cand_set[..., None] == own[:, None, None, :]) & cand_recip  # [R, k1+1, half+1]
        accept = recip & (inside.sum(-1) > 2.0 / 3.0 * cand_recip.sum(-1))  # [R, k1+1]
        extra = np.where(accept[..., None], cand_set, -1).reshape(len(r), -1)
        members = np.sort(np.concatenate([own, extra], axis=1), axis=1)
        members[:, 1:][members[:, 1:] == members[:, :-1]] = -1  # drop repeats (sorted, so adjacent)
        rows_all.append(np.broadcast_to(r[:, None], members.shape)[members >= 0])
        members_all.append(members[members >= 0])
    row_idx = np.concatenate(rows_all) if rows_all else np.empty(0, np.int64)
    col_idx = np.concatenate(members_all) if members_all else np.empty(0, np.int64)
    # Distances: from the neighbour lists where the member is there, computed otherwise.
    dist = np.full(len(row_idx), np.nan, dtype=np.float32)
    order = np.lexsort((col_idx, row_idx))
    row_idx, col_idx = row_idx[order], col_idx[order]
    table_rows = np.repeat(np.arange(n), nn.shape[1])
    table_key = table_rows * n + nn.reshape(-1)
    key = row_idx * n + col_idx
    sort_key = np.argsort(table_key, kind="stable")
    pos = np.searchsorted(table_key[sort_key], key)
    pos = np.minimum(pos, len(table_key) - 1)
    found = table_key[sort_key][pos] == key
    dist[found] = nn_dist.reshape(-1)[sort_key[pos[found]]]
    if (~found).any():
        dist[~found] = pair_sq_distances(x, row_idx[~found], col_idx[~found])
    weight = np.exp(-dist / np.maximum(row_max[row_idx], 1e-12))
    sums = np.bincount(row_idx, weights=weight, minlength=n)
    values = weight / sums[row_idx]
    return sp.csr_matrix((values, (row_idx, col_idx)), shape=(n, n))


def reranking_graph(
    features: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 1,
    device: torch.device | str = "cpu",
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> KnnGraph:
    """The neighbour lists of every row of ``features`` that :func:`k_reciprocal_distances`
    needs for these k1 and k2 (and the distances of ``pairs``, :func:`wakd.knn.knn_graph`).

    The search runs on faiss's GPU when ``device`` is a CUDA device and this faiss build
    has GPU support, on the CPU otherwise.
    """
    use_gpu = torch.device(device).type == "cuda" and gpu_available()
    return knn_graph(features, _graph_size(k1, k2, len(features)), use_gpu=use_gpu, pairs=pairs)


def _graph_size(k1: int, k2: int, n: int) -> int:
    """Neighbours per row the re-ranking needs: N(i, k1) is the k1 + 1 nearest, and the
    query expansion averages over the k2 nearest."""
    return min(max(k1 + 1, k2), n)


def k_reciprocal_distances(
    features: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 1,
    lambda_value: float = 0.1,
    device: torch.device | str = "cpu",
    pair_distances: np.ndarray | None = None,
    graph: KnnGraph | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked and Jaccard distances of the row pairs (a[p], b[p]) of ``features`` [N, D].

    Returns (final [P], jaccard [P]) with final = (1 - lambda) * jaccard + lambda * d, d the
    squared L2 distance divided by the maximum of row a[p] (steps in the module docstring).
    ``pair_distances`` [P]: the pairs' squared L2 distances where the caller has them
    already (a mining round does), so that they are not computed again; ``graph``: the
    :func:`reranking_graph` of ``features`` for the same k1 and k2, likewise (searched on
    ``device`` otherwise).
    """
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"need k1 >= 1, k2 >= 1, 0 <= lambda <= 1 (got {k1}, {k2}, {lambda_value})")
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pair index arrays differ in length: {a.shape} vs {b.shape}")
    if pair_distances is not None and np.shape(pair_distances) != a.shape:
        raise ValueError(f"pair_distances has shape {np.shape(pair_distances)}, the pairs {a.shape}")
    x = np.asarray(features)
    n = x.shape[0]
    if len(a) == 0:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    k = _graph_size(k1, k2, n)
    if graph is None:
        graph = reranking_graph(x, k1=k1, k2=k2, device=device)
    elif graph.indices.shape != (n, k):
        raise ValueError(f"graph has neighbour lists {graph.indices.shape}; k1={k1}, k2={k2} need {(n, k)}")
    nn_dist, nn, row_max = graph.distances, graph.indices, graph.row_max
    k1 = min(k1, k - 1)
    ends = np.unique(np.concatenate([a, b]))  # rows whose expanded V the pairs need
    k2 = min(k2, k)
    if k2 > 1:
        expand_rows = np.unique(nn[ends, :k2])
        v = _k_reciprocal_weights(x, nn, nn_dist, row_max, expand_rows, k1)
        mean = sp.csr_matrix(
            (np.full(len(ends) * k2, 1.0 / k2), (np.repeat(ends, k2), nn[ends, :k2].reshape(-1))),
            shape=(n, n),
        )
        v = (mean @ v).tocsr()
    else:
        v = _k_reciprocal_weights(x, nn, nn_dist, row_max, ends, k1)
    overlap = np.asarray(v[a].minimum(v[b]).sum(axis=1)).reshape(-1)
    jaccard = (1.0 - overlap / (2.0 - overlap)).astype(np.float32)
    if pair_distances is None:
        pair_distances = pair_sq_distances(x, a, b)
    original = np.asarray(pair_distances, dtype=np.float32) / np.maximum(row_max[a], 1e-12)
    final = (1.0 - lambda_value) * jaccard + lambda_value * original
    return final.astype(np.float32), jaccard
