"""Recall@N of a descriptor network on one split: extract -> (PCA) -> kNN -> Recall@N."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from wakd.data.datasets import PlaceSplit
from wakd.describe import extract_descriptors, split_descriptors
from wakd.eval.recall import dedup_by_group, recall_at_n
from wakd.knn import knn_search


@dataclass
class Retrieval:
    recall: dict[int, float]
    topk: np.ndarray  # [Q, max N] int64 database indices, best first (-1 = none)
    distances: np.ndarray  # [Q, max N] float32 squared L2
    q_desc: np.ndarray  # [Q, D] float16
    db_desc: np.ndarray  # [N, D] float16
    images_per_second: float
    seconds: float
    num_skipped: int  # corrupt images skipped (data.skip_corrupt=true)


def retrieve(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    split: PlaceSplit,
    ns: Sequence[int] = (1, 5, 10, 20),
    db_valid: np.ndarray | None = None,
) -> tuple[dict[int, float], np.ndarray, np.ndarray]:
    """Top-max(ns) database images per query and Recall@N (25 m rule, de-duplicated per panorama)."""
    k = max(ns)
    db_index = np.arange(len(db_desc)) if db_valid is None else np.flatnonzero(db_valid)
    # Panorama de-duplication needs more raw hits than k: 12 cut-outs per panorama in Tokyo 24/7.
    raw_k = k * 12 if split.db_group_ids is not None else k
    distances, local = knn_search(db_desc[db_index], q_desc, min(raw_k, len(db_index)))
    topk = np.where(local >= 0, db_index[np.clip(local, 0, None)], -1)
    if split.db_group_ids is not None:
        topk, distances = dedup_by_group(topk, distances, split.db_group_ids, k)
    elif topk.shape[1] < k:  # database smaller than k: pad so every N has a column
        pad = k - topk.shape[1]
        topk = np.pad(topk, ((0, 0), (0, pad)), constant_values=-1)
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
    return recall_at_n(topk, split.eval_positives(), ns), topk, distances


@torch.no_grad()
def evaluate_split(
    net: nn.Module,
    split: PlaceSplit,
    images: Dataset,
    *,
    ns: Sequence[int] = (1, 5, 10, 20),
    batch_size: int = 16,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Retrieval:
    """``images`` holds the split's queries followed by its database images."""
    start = time.perf_counter()
    extraction = extract_descriptors(
        net, images, batch_size=batch_size, num_workers=num_workers, device=device,
        desc=f"describe {split.name}/{split.split}", progress=progress,
    )
    q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
    db_valid = extraction.valid[split.num_queries :]
    recall, topk, distances = retrieve(q_desc, db_desc, split, ns, db_valid=db_valid)
    return Retrieval(
        recall=recall,
        topk=topk,
        distances=distances,
        q_desc=q_desc,
        db_desc=db_desc,
        images_per_second=extraction.images_per_second,
        seconds=time.perf_counter() - start,
        num_skipped=int((~extraction.valid).sum()),
    )
