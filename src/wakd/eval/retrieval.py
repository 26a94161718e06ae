"""Recall@N of a descriptor network on one split: extract -> (PCA) -> kNN -> Recall@N."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from wakd.ann import SearchSpec, search
from wakd.data.datasets import PlaceSplit
from wakd.describe import extract_descriptors, split_descriptors
from wakd.eval.recall import dedup_by_group, recall_at_n


@dataclass
class Retrieval:
    recall: dict[int, float]
    topk: np.ndarray  # [Q, max N] int64 database indices, best first (-1 = none)
    distances: np.ndarray  # [Q, max N] float32 squared L2
    q_desc: np.ndarray  # [Q, D] float16 (memory-mapped with a store)
    db_desc: np.ndarray  # [N, D] float16 (memory-mapped with a store)
    images_per_second: float
    seconds: float
    num_skipped: int  # corrupt images skipped (data.skip_corrupt=true)


def retrieve(
    q_desc: np.ndarray,
    db_desc: np.ndarray,
    split: PlaceSplit,
    ns: Sequence[int] = (1, 5, 10, 20),
    db_valid: np.ndarray | None = None,
    spec: SearchSpec | None = None,
) -> tuple[dict[int, float], np.ndarray, np.ndarray]:
    """Top-max(ns) database images per query and Recall@N (25 m rule, de-duplicated per panorama).

    ``spec``: exact (None) or an approximate index (``wakd.ann``). Database images marked
    invalid (skipped as corrupt) are searched like the others and then struck from the
    lists, each widening the search by one: the database is never copied without them,
    which would double the memory of a memory-mapped store.
    """
    k = max(ns)
    valid = np.ones(len(db_desc), dtype=bool) if db_valid is None else np.asarray(db_valid, dtype=bool)
    num_valid = int(valid.sum())
    # Panorama de-duplication needs more raw hits than k: 12 cut-outs per panorama in Tokyo 24/7.
    raw_k = min(k * 12 if split.db_group_ids is not None else k, num_valid)
    distances, topk = search(db_desc, q_desc, raw_k + len(valid) - num_valid, spec)
    if num_valid < len(valid):
        topk, distances = _strike(topk, distances, valid, raw_k)
    if split.db_group_ids is not None:
        topk, distances = dedup_by_group(topk, distances, split.db_group_ids, k)
    elif topk.shape[1] < k:  # database smaller than k: pad so every N has a column
        pad = k - topk.shape[1]
        topk = np.pad(topk, ((0, 0), (0, pad)), constant_values=-1)
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
    return recall_at_n(topk, split.eval_positives(), ns), topk, distances


def _strike(topk: np.ndarray, distances: np.ndarray, valid: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists [Q, K] without the invalid database images, order kept, cut or padded (-1, inf) to ``width``."""
    keep = (topk >= 0) & valid[np.clip(topk, 0, None)]  # [Q,K]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # kept entries first, in their order
    kept = np.take_along_axis(keep, order, axis=1)
    return (
        np.where(kept, np.take_along_axis(topk, order, axis=1), -1),
        np.where(kept, np.take_along_axis(distances, order, axis=1), np.inf).astype(np.float32),
    )


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
    store: str | os.PathLike | None = None,
    spec: SearchSpec | None = None,
) -> Retrieval:
    """``images`` holds the split's queries followed by its database images.

    ``store``: stream the descriptors to this ``.npy`` (``wakd.store``) instead of RAM;
    ``spec``: exact search (None) or an approximate index (``wakd.ann``).
    """
    start = time.perf_counter()
    extraction = extract_descriptors(
        net, images, batch_size=batch_size, num_workers=num_workers, device=device,
        desc=f"describe {split.name}/{split.split}", progress=progress, store=store,
    )
    q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
    db_valid = extraction.valid[split.num_queries :]
    recall, topk, distances = retrieve(q_desc, db_desc, split, ns, db_valid=db_valid, spec=spec)
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
