"""Weakly supervised tuple mining (NetVLAD / SARE / SFRS).

Only GPS is known, so a training tuple is built in descriptor space: the anchor query,
its nearest positive (within 10 m, by the current descriptors: it feeds the hard loss),
its ``neg_num`` hardest negatives (beyond 25 m) drawn from ``neg_pool`` random
candidates plus the negatives this query had last time, and ``pos_num`` positives for
the SFRS soft loss.

The soft-loss positives are the ``pos_num`` nearest; with ``rerank=True`` (SFRS, from
generation 1) the ``pos_pool`` nearest are first re-ranked by the k-reciprocal distance
(:mod:`wakd.data.rerank`) over all training queries and database images. The hard-loss
positive is always the nearest by the original distance, as in the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from wakd.data.datasets import PlaceSplit
from wakd.data.rerank import k_reciprocal_distances, reranking_graph
from wakd.knn import (
    cross_pair_sq_distances,
    formula_error_bound,
    k_smallest_per_list,
    pair_sq_distances,
)

POSITIVE_SELECTIONS = ("top", "gain")
# A round's descriptors are copied to fp32 when the copy takes at most this (the demo
# city's 2,648 x 4,096: 43 MB; Pitts30k-train's 17k x 32k-d would take 2.3 GB).
FP32_COPY_BYTES = 512 << 20


def _fp32_chunks(x: np.ndarray, rows: int = 4096) -> Iterator[np.ndarray]:
    for r in range(0, len(x), rows):
        yield x[r : r + rows].astype(np.float32, copy=False)


@dataclass(frozen=True)
class MinedTuple:
    query: int  # query index in the split
    hard_positive: int  # db index of the nearest positive by the original distance (hard loss)
    negatives: np.ndarray  # [neg_num] db indices, hardest first
    positives: np.ndarray  # [pos_num] db indices for the soft loss, nearest (or best re-ranked) first


def select_positives(pool: np.ndarray, reranked: np.ndarray | None, pos_num: int, rule: str = "top") -> np.ndarray:
    """``pos_num`` positives of ``pool`` (ordered by the original distance, nearest first).

    Without re-ranked distances: the first ``pos_num``. With them, ``rule``:
    - ``top``: the ``pos_num`` nearest by the re-ranked distance;
    - ``gain``: OpenIBL's SFRS sampler: the positives that rose in rank under re-ranking,
      the largest rise first, then those whose rank did not change (in re-ranked order);
      positives that fell are never taken (so there may be fewer than ``pos_num``).
    """
    if reranked is None:
        return pool[:pos_num]
    order = np.argsort(reranked, kind="stable")  # position p in re-ranked order -> original rank
    if rule == "top":
        return pool[order[:pos_num]]
    if rule != "gain":
        raise ValueError(f"unknown positive selection {rule!r}; expected one of {POSITIVE_SELECTIONS}")
    gap = np.arange(len(order)) - order  # < 0: rose
    rose = np.flatnonzero(gap < 0)
    rose = rose[np.argsort(gap[rose], kind="stable")]
    keep = np.concatenate([rose, np.flatnonzero(gap == 0)])[:pos_num]
    return pool[order[keep]]


class TupleMiner:
    """Mines tuples from a split; remembers each query's last hard negatives."""

    def __init__(
        self,
        split: PlaceSplit,
        pos_num: int = 3,
        neg_num: int = 3,
        pos_pool: int = 20,
        neg_pool: int = 1000,
        rerank_k1: int = 20,
        rerank_k2: int = 1,
        rerank_lambda: float = 0.1,
        rerank_select: str = "gain",
    ) -> None:
        if pos_num < 1 or neg_num < 1:
            raise ValueError(f"pos_num and neg_num must be >= 1 (got {pos_num}, {neg_num})")
        if rerank_select not in POSITIVE_SELECTIONS:
            raise ValueError(f"rerank_select must be one of {POSITIVE_SELECTIONS}, got {rerank_select!r}")
        self.split = split
        self.pos_num, self.neg_num = pos_num, neg_num
        self.pos_pool, self.neg_pool = max(pos_pool, pos_num), neg_pool
        self.rerank_args = dict(k1=rerank_k1, k2=rerank_k2, lambda_value=rerank_lambda)
        self.rerank_select = rerank_select
        self.queries = split.queries_with_train_positive()  # queries without a 10 m positive are dropped
        self.positives = split.train_positives()
        self.non_negatives = split.non_negatives()
        self.last_negatives: dict[int, np.ndarray] = {}

    def mine(
        self,
        query_ids: np.ndarray,
        q_desc: np.ndarray,
        db_desc: np.ndarray,
        rng: np.random.Generator,
        rerank: bool = False,
        device: torch.device | str = "cpu",
    ) -> list[MinedTuple]:
        """Build one tuple per query from current descriptors (``[M, D]``, ``[N, D]``).

        ``rerank``: choose positives by the k-reciprocal distance (computed on ``device``).
        """
        query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        # Negative candidates first (the same draws, in the same order, as one query at a
        # time): random candidates + last time's hardest, minus anything within 25 m.
        neg_candidates = []
        chosen = np.zeros(len(db_desc), dtype=bool)  # one mask reused: sorted sets without np.unique
        for q in query_ids:
            q = int(q)
            chosen[rng.choice(len(db_desc), size=min(self.neg_pool, len(db_desc)), replace=False)] = True
            chosen[self.last_negatives.get(q, np.empty(0, np.int64))] = True
            chosen[self.non_negatives[q]] = False
            candidates = np.flatnonzero(chosen)
            chosen[candidates] = False
            if len(candidates) < self.neg_num:
                raise ValueError(
                    f"query {q} of {self.split.name}/{self.split.split} has only {len(candidates)} "
                    f"negative candidates (> {self.split.eval_radius:g} m); lower neg_num or use a larger split"
                )
            neg_candidates.append(candidates)
        pos_candidates = [self.positives[int(q)] for q in query_ids]
        if not len(query_ids):
            return []
        # Every distance of the round in one pass, in fp32 by the norm formula (a row
        # gathered and differenced per query and candidate took most of the round,
        # bench/p6_mining_round.py); the few pairs whose order its rounding leaves in
        # doubt are re-scored exactly, so the tuples are those of exact distances.
        # x [M + N, D]: database rows follow the queries, converted to fp32 (exact for
        # fp16) once where that copy is small; larger sets stay as stored.
        total = (len(q_desc) + len(db_desc)) * q_desc.shape[1] * 4
        x = np.concatenate([q_desc, db_desc], dtype=np.float32 if total <= FP32_COPY_BYTES else None)
        lists = [*pos_candidates, *neg_candidates]  # list i belongs to query i mod len(query_ids)
        lengths = np.array([len(c) for c in lists])
        rows = np.repeat(np.tile(np.arange(len(query_ids)), 2), lengths)  # into query_ids
        cols = np.concatenate(lists)  # database indices
        graph = None
        if rerank:  # the re-ranking graph's pass computes all of them anyway
            graph = reranking_graph(x, k1=self.rerank_args["k1"], k2=self.rerank_args["k2"], device=device,
                                    pairs=(query_ids[rows], cols + len(q_desc)))  # fmt: skip
            approx = graph.pair_distances
        else:
            approx = cross_pair_sq_distances(x[query_ids], x[len(q_desc) :], rows, cols)
        sq_norms = np.concatenate([np.einsum("nd,nd->n", c, c) for c in _fp32_chunks(x)])
        bound = formula_error_bound(x.shape[1], sq_norms[query_ids].max() + sq_norms[len(q_desc) :].max())

        def exact(positions: np.ndarray) -> np.ndarray:
            return pair_sq_distances(x, query_ids[rows[positions]], cols[positions] + len(q_desc), dtype=np.float64)

        n_pos = int(lengths[: len(query_ids)].sum())
        # Positive pools: the pos_pool nearest positives (within 10 m) in descriptor space.
        pool_at, pool_dist = k_smallest_per_list(approx[:n_pos], bound, lengths[: len(query_ids)], self.pos_pool, exact)
        pool_sizes = np.minimum(lengths[: len(query_ids)], self.pos_pool)
        pools = np.split(cols[pool_at], np.cumsum(pool_sizes)[:-1])
        # The neg_num hardest negatives, hardest first.
        hardest_at, _ = k_smallest_per_list(approx[n_pos:], bound, lengths[len(query_ids) :], self.neg_num,
                                            lambda positions: exact(positions + n_pos))  # fmt: skip
        hardest = cols[n_pos + hardest_at].reshape(len(query_ids), self.neg_num)
        reranked: list[np.ndarray | None] = [None] * len(pools)
        if rerank:
            a = np.repeat(query_ids, pool_sizes)
            final, _ = k_reciprocal_distances(x, a, cols[pool_at] + len(q_desc), pair_distances=pool_dist,
                                              graph=graph, **self.rerank_args)  # fmt: skip
            reranked = np.split(final, np.cumsum(pool_sizes)[:-1])
        tuples = []
        for q, pos_pool, pos_reranked, negatives in zip(query_ids, pools, reranked, hardest, strict=True):
            q = int(q)
            positives = select_positives(pos_pool, pos_reranked, self.pos_num, self.rerank_select)
            if len(positives) < self.pos_num:  # few positives: repeat the nearest ones
                positives = np.resize(positives, self.pos_num)
            self.last_negatives[q] = negatives
            tuples.append(MinedTuple(q, int(pos_pool[0]), negatives, positives.astype(np.int64)))
        return tuples
