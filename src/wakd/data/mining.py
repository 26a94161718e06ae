"""Weakly supervised tuple mining (NetVLAD / SARE / SFRS).

Only GPS is known, so a training tuple is built in descriptor space: the anchor query,
its ``pos_num`` nearest positives (within 10 m; the first one feeds the hard loss) and
its ``neg_num`` hardest negatives (beyond 25 m) drawn from ``neg_pool`` random
candidates plus the negatives this query had last time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wakd.data.datasets import PlaceSplit


@dataclass(frozen=True)
class Tuple:
    query: int  # query index in the split
    positives: np.ndarray  # [pos_num] db indices, nearest in descriptor space first
    negatives: np.ndarray  # [neg_num] db indices, hardest first


class TupleMiner:
    """Mines tuples from a split; remembers each query's last hard negatives."""

    def __init__(
        self,
        split: PlaceSplit,
        pos_num: int = 3,
        neg_num: int = 3,
        pos_pool: int = 20,
        neg_pool: int = 1000,
    ) -> None:
        if pos_num < 1 or neg_num < 1:
            raise ValueError(f"pos_num and neg_num must be >= 1 (got {pos_num}, {neg_num})")
        self.split = split
        self.pos_num, self.neg_num = pos_num, neg_num
        self.pos_pool, self.neg_pool = max(pos_pool, pos_num), neg_pool
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
    ) -> list[Tuple]:
        """Build one tuple per query from current descriptors (``[M, D]``, ``[N, D]``)."""
        q_all = torch.from_numpy(q_desc)
        db_all = torch.from_numpy(db_desc)
        tuples = []
        for q in query_ids:
            q = int(q)
            anchor = q_all[q].float()  # [D]
            # Positives: the pos_pool geographically nearest, re-ordered by descriptor distance.
            pos_pool = self.positives[q][: self.pos_pool]
            pos_dist = _sq_dist(anchor, db_all[pos_pool])
            positives = pos_pool[np.argsort(pos_dist, kind="stable")][: self.pos_num]
            if len(positives) < self.pos_num:  # few positives: repeat the nearest ones
                positives = np.resize(positives, self.pos_num)
            # Negatives: random candidates + last time's hardest, minus anything within 25 m.
            candidates = rng.choice(len(db_desc), size=min(self.neg_pool, len(db_desc)), replace=False)
            candidates = np.union1d(candidates, self.last_negatives.get(q, np.empty(0, np.int64)))
            candidates = candidates[~np.isin(candidates, self.non_negatives[q])]
            if len(candidates) < self.neg_num:
                raise ValueError(
                    f"query {q} of {self.split.name}/{self.split.split} has only {len(candidates)} "
                    f"negative candidates (> {self.split.eval_radius:g} m); lower neg_num or use a larger split"
                )
            neg_dist = _sq_dist(anchor, db_all[candidates])
            hardest = np.argpartition(neg_dist, self.neg_num - 1)[: self.neg_num]
            negatives = candidates[hardest[np.argsort(neg_dist[hardest], kind="stable")]]
            self.last_negatives[q] = negatives
            tuples.append(Tuple(q, positives.astype(np.int64), negatives.astype(np.int64)))
        return tuples

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors, not arrays: checkpoints are read back with ``weights_only=True``."""
        queries = sorted(self.last_negatives)
        negatives = [torch.from_numpy(self.last_negatives[q]) for q in queries]
        return {
            "queries": torch.tensor(queries, dtype=torch.int64),
            "negatives": torch.stack(negatives) if negatives else torch.empty((0, self.neg_num), dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.last_negatives = {
            int(q): n.numpy().astype(np.int64) for q, n in zip(state["queries"], state["negatives"], strict=True)
        }


def _sq_dist(anchor: torch.Tensor, others: torch.Tensor) -> np.ndarray:
    """Squared L2 distances of one descriptor [D] to rows of [n, D] (fp16 storage, fp32 math)."""
    return (others.float() - anchor).pow(2).sum(1).numpy()
