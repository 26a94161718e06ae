"""Evaluation outputs: results.json, predictions.npz and Markdown recall tables.

Every file is written through :mod:`wakd.atomic`, so a crash never leaves a truncated
result behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wakd.atomic import atomic_write_json, atomic_write_path

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.npz"


def write_results(
    run_dir: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    checkpoint: str | None,
    num_queries: int,
    num_database: int,
    descriptor_dim: int,
    recall: Mapping[int, float],
    images_per_second: float,
    seconds_total: float,
    **extra: Any,
) -> Path:
    """Write ``run_dir/results.json``; recall keys become strings ("1", "5", ...)."""
    for n, value in recall.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"recall@{n} = {value} is not a fraction in [0, 1]")
    results = {
        "dataset": dataset,
        "split": split,
        "checkpoint": checkpoint,
        "num_queries": int(num_queries),
        "num_database": int(num_database),
        "descriptor_dim": int(descriptor_dim),
        "recall": {str(int(n)): float(v) for n, v in sorted(recall.items())},
        "images_per_second": float(images_per_second),
        "seconds_total": float(seconds_total),
        **extra,
    }
    return atomic_write_json(Path(run_dir) / RESULTS_NAME, results)


def write_predictions(
    run_dir: str | os.PathLike,
    query_paths: list[str],
    database_paths: list[str],
    topk: np.ndarray,
    distances: np.ndarray,
) -> Path:
    """Write ``run_dir/predictions.npz``, loadable with ``np.load(..., allow_pickle=False)``.

    Arrays: query_paths [Q] and database_paths [N] unicode, topk [Q,K] int64,
    distances [Q,K] float32.
    """
    topk = np.asarray(topk, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float32)
    if topk.shape != distances.shape or topk.shape[0] != len(query_paths):
        raise ValueError(
            f"topk {topk.shape}, distances {distances.shape}, {len(query_paths)} queries"
        )
    arrays = {
        # dtype=str gives fixed-width unicode, never object arrays that need pickle.
        "query_paths": np.asarray(query_paths, dtype=str).reshape(-1),
        "database_paths": np.asarray(database_paths, dtype=str).reshape(-1),
        "topk": topk,
        "distances": distances,
    }
    path = Path(run_dir) / PREDICTIONS_NAME
    # An open file, not the name: np.savez would append ".npz" to the temporary name.
    with atomic_write_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def recall_table(
    rows: Mapping[str, Mapping[int, float]] | Iterable[tuple[str, Mapping[int, float]]],
) -> str:
    """Markdown table: one row per name, one R@N column (percent, one decimal) per cut-off.

    ``rows`` is {name: {n: recall}} or a list of (name, {n: recall}) pairs; a missing
    cut-off is shown as "-".
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    ns = sorted({int(n) for _, recall in items for n in recall})
    lines = [
        "| Model | " + " | ".join(f"R@{n}" for n in ns) + " |",
        "|---|" + "---:|" * len(ns),
    ]
    for name, recall in items:
        by_n = {int(n): v for n, v in recall.items()}
        cells = [f"{100 * by_n[n]:.1f}" if n in by_n else "-" for n in ns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
