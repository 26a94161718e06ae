"""Qualitative figures: retrieval grids, Recall@N curves and attention overlays.

Figures are drawn with the Agg canvas directly (no pyplot global state, no
display needed) and written atomically as PNG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wakd.atomic import atomic_write_bytes
from wakd.eval.recall import hit_matrix

CORRECT_COLOR = "tab:green"
WRONG_COLOR = "tab:red"
QUERY_COLOR = "tab:blue"


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _framed_image(ax: Axes, image: np.ndarray, color: str | None) -> None:
    """Show ``image`` with a coloured frame (spines stay visible, ticks do not)."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_edgecolor(color)
            spine.set_linewidth(4)


def plot_retrievals(
    path: str | os.PathLike,
    query_images: Sequence[np.ndarray],
    retrieved_images: Sequence[Sequence[np.ndarray]],
    correct: Sequence[Sequence[bool]],
    titles: Sequence[str] | None = None,
) -> None:
    """Grid with one row per query: the query ([H,W,3] uint8) then its ranked retrievals,
    each framed green when correct and red when not."""
    num_rows = len(query_images)
    if not num_rows or len(retrieved_images) != num_rows or len(correct) != num_rows:
        raise ValueError("need the same non-zero number of queries, retrieval lists and flags")
    num_cols = 1 + max(len(r) for r in retrieved_images)
    fig = Figure(figsize=(2.2 * num_cols, 2.0 * num_rows))
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for r in range(num_rows):
        _framed_image(axes[r, 0], query_images[r], QUERY_COLOR)
        axes[r, 0].set_title(titles[r] if titles else "query", fontsize=8)
        for c in range(1, num_cols):
            if c - 1 < len(retrieved_images[r]):
                ok = bool(correct[r][c - 1])
                _framed_image(axes[r, c], retrieved_images[r][c - 1], CORRECT_COLOR if ok else WRONG_COLOR)
                axes[r, c].set_title(f"#{c}", fontsize=8)
            else:
                axes[r, c].set_axis_off()
    fig.tight_layout()
    _save(fig, path)


def plot_recall_curve(
    path: str | os.PathLike, curves: Mapping[str, Mapping[int, float]]
) -> None:
    """Recall@N (percent) against N, one line per model."""
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for name, recall in curves.items():
        ns = sorted(int(n) for n in recall)
        by_n = {int(n): v for n, v in recall.items()}
        ax.plot(ns, [100 * by_n[n] for n in ns], marker="o", label=name)
    ax.set_xlabel("N")
    ax.set_ylabel("Recall@N (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_attention(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    maps: Mapping[str, Sequence[np.ndarray]],
) -> None:
    """Attention overlays: one row per model name, one column per image.

    Each [h,w] map is min-max scaled and drawn bilinearly stretched over its
    [H,W,3] uint8 image with the jet colormap at alpha 0.5.
    """
    if not images or not maps:
        raise ValueError("need at least one image and one model")
    for name, model_maps in maps.items():
        if len(model_maps) != len(images):
            raise ValueError(f"{name}: {len(model_maps)} maps for {len(images)} images")
    jet = matplotlib.colormaps["jet"]
    fig = Figure(figsize=(2.5 * len(images), 2.2 * len(maps)))
    axes = fig.subplots(len(maps), len(images), squeeze=False)
    for r, (name, model_maps) in enumerate(maps.items()):
        for c, (image, att) in enumerate(zip(images, model_maps, strict=True)):
            ax = axes[r, c]
            height, width = image.shape[:2]
            att = np.asarray(att, dtype=np.float32)
            span = float(att.max() - att.min())
            att = (att - att.min()) / span if span > 0 else np.zeros_like(att)
            ax.imshow(image)
            # The extent stretches the h x w map over exactly the pixels of the H x W
            # image, whose own extent runs from -0.5 to size - 0.5.
            ax.imshow(att, cmap=jet, alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear",
                      extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def pick_examples(
    topk: np.ndarray, positives: Sequence[np.ndarray], num: int, seed: int = 0
) -> list[int]:
    """Query indices to illustrate: about half correct and half wrong at R@1.

    When one kind is scarce the other fills the remaining slots. Correct ones
    come first; the choice is random but fixed by ``seed``.
    """
    top1_ok = hit_matrix(np.asarray(topk)[:, :1], positives)[:, 0]  # [Q]
    good, bad = np.flatnonzero(top1_ok), np.flatnonzero(~top1_ok)
    num = min(num, top1_ok.size)
    num_good = min(good.size, max(num - bad.size, num // 2 + num % 2))
    rng = np.random.default_rng(seed)
    chosen_good = np.sort(rng.choice(good, num_good, replace=False))
    chosen_bad = np.sort(rng.choice(bad, num - num_good, replace=False))
    return [int(i) for i in np.concatenate([chosen_good, chosen_bad])]
