"""The protocol card: what a Recall@N figure was measured under, in results.json and checkpoints.

A card has two parts.

``protocol`` — the fields two results must share to stand side by side (the report refuses
otherwise, naming the field); they fix which queries are asked, against which database, and
what counts as found:

* ``dataset``, ``variant`` (one dataset may have several protocols: MSLS ``msls-val`` vs
  ``msls-val-folder``), ``split``;
* ``file_list_sha256``: SHA-256 of the ordered query then database file lists
  (:func:`file_list_hash`), and ``num_queries``, ``num_database``;
* ``queries_without_positive`` and ``no_positive_queries`` (how they count: misses, kept in
  the denominator, :func:`wakd.eval.recall.recall_at_n`);
* ``pos_dist_thr`` (metres), ``time_rule`` (Tokyo TM: a positive needs another time stamp),
  ``panorama_dedup`` (Tokyo 24/7: one hit per panorama before Recall@N);
* ``image_size`` [H, W], ``resize`` (the rule applied to queries and database images, in words)
  and ``query_shorter_side`` (Tokyo 24/7's query resizing, when asked for).

``descriptive`` — what was measured, which may differ between the rows of one table:
``model``, ``weights_sha256`` (:func:`weights_hash`, the same for a checkpoint's card and for
the results of evaluating it), ``checkpoint``, ``pca`` (where PCA was fitted and its file),
``search`` (index and parameters), ``wakd_version``, ``git_commit``, ``seed`` and
``selected_on`` (the validation split and metric that chose a training checkpoint).
PCA source and search index are descriptive: they belong to the method being compared, not
to the test; a table shows them per row.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from wakd.ann import SearchSpec
from wakd.data.datasets import PlaceSplit
from wakd.models.checkpoints import load_torch_file
from wakd.resolvers import file_digest

NO_POSITIVE_RULE = "counted as misses (kept in the denominator)"


class ProtocolMismatch(ValueError):
    """Two cards whose protocol fields differ; ``field`` names the first that does."""

    def __init__(self, field: str, first: Any, second: Any, first_source: str = "", second_source: str = "") -> None:
        self.field = field
        first_at = f" ({first_source})" if first_source else ""
        second_at = f" ({second_source})" if second_source else ""
        super().__init__(
            f"protocol field {field!r} differs: {first!r}{first_at} vs {second!r}{second_at}; these results "
            "were measured under different protocols and cannot be compared side by side"
        )


def file_list_hash(query_files: Sequence[str], database_files: Sequence[str]) -> str:
    """SHA-256 of the ordered file lists: "queries", then one name per line, then "database"."""
    text = "\n".join(["queries", *query_files, "database", *database_files])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's tensors in name order (name, dtype, shape, bytes): the same
    digest for a network in training and for the network eval.py loads from its checkpoint.
    PCA (``pca.*``) is left out: the card describes it apart, and eval.py fits it after loading."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state if not k.startswith("pca.")):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def wakd_version() -> str | None:
    try:
        return importlib.metadata.version("wakd")
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (``+dirty`` with uncommitted changes),
    or None outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def resize_rule(
    image_size: Sequence[int] | None, resize: str = "bilinear", query_shorter_side: int | None = None
) -> str:
    """In words: how queries and database images were resized before description."""
    if image_size is None or resize == "none":
        database = "at its own size"
    else:
        h, w = image_size
        database = f"to {h}x{w} (torchvision Resize, {resize}, antialiased)"
    if query_shorter_side is None:
        return f"queries and database images {database}"
    return (f"database images {database}; queries to a {query_shorter_side}-pixel shorter side, "
            f"aspect kept (torchvision Resize, {resize}, antialiased)")


def split_protocol(
    split: PlaceSplit, *, dataset: str, variant: str | None, image_size: Sequence[int] | None,
    resize: str = "bilinear", query_shorter_side: int | None = None,
) -> dict[str, Any]:
    """The protocol part of a card for evaluating ``split`` (module docstring)."""
    size = None if image_size is None or resize == "none" else [int(s) for s in image_size]
    return {
        "dataset": dataset,
        "variant": variant or dataset,
        "split": split.split,
        "file_list_sha256": file_list_hash(split.q_rel, split.db_rel),
        "num_queries": int(split.num_queries),
        "num_database": int(split.num_db),
        "queries_without_positive": int(sum(len(p) == 0 for p in split.eval_positives())),
        "no_positive_queries": NO_POSITIVE_RULE,
        "pos_dist_thr": float(split.eval_radius),
        "time_rule": "a positive needs another time stamp than its query" if split.q_timestamps is not None else None,
        "panorama_dedup": split.db_group_ids is not None,
        "image_size": size,
        "resize": resize_rule(size, resize, query_shorter_side),
        "query_shorter_side": query_shorter_side,
    }


def search_description(spec: SearchSpec) -> dict[str, Any]:
    if spec.exact:
        return {"index": spec.index}
    return asdict(spec)


def card(
    protocol: dict[str, Any],
    *,
    model: str,
    weights_sha256: str | None,
    checkpoint: str | None,
    seed: int | None,
    pca: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
    selected_on: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """A whole card: ``protocol`` (from :func:`split_protocol`) and the descriptive fields."""
    return {
        "protocol": protocol,
        "descriptive": {
            "model": model,
            "weights_sha256": weights_sha256,
            "checkpoint": checkpoint,
            "pca": dict(pca) if pca else None,
            "search": dict(search) if search else None,
            "wakd_version": wakd_version(),
            "git_commit": git_commit(),
            "seed": seed,
            "selected_on": dict(selected_on) if selected_on else None,
        },
    }


# A model's own input size and filter (a published model's, or the dataset's for wakd
# networks): models are compared each at its own input, as the field does; the queries'
# resizing (query_shorter_side) is the test set's and must match.
MODEL_INPUT_FIELDS = frozenset({"image_size", "resize"})


def check_same_protocol(cards: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Raise :class:`ProtocolMismatch` naming the first protocol field (other than the
    model's input, ``MODEL_INPUT_FIELDS``) on which two of the ``(source, card)`` pairs
    differ, with both values and both sources."""
    items = list(cards)
    if not items:
        return
    first_source, first = items[0]
    for source, other in items[1:]:
        a, b = first["protocol"], other["protocol"]
        for field in sorted((a.keys() | b.keys()) - MODEL_INPUT_FIELDS):
            if a.get(field) != b.get(field):
                raise ProtocolMismatch(field, a.get(field), b.get(field), first_source, source)


def training_card(trainer: Any, net: torch.nn.Module, model: str | None) -> dict[str, dict[str, Any]] | None:
    """The card of a training checkpoint: the validation protocol that selects checkpoints
    (``selected_on``: that split and the monitored metrics), the weights being saved; None
    where the datamodule has no validation split."""
    datamodule = getattr(trainer, "datamodule", None)
    split: PlaceSplit | None = getattr(datamodule, "val_split", None)
    if split is None:
        return None
    dataset_cfg = getattr(datamodule, "dataset_cfg", None) or {}
    dataset = dataset_cfg.get("name", split.name)
    monitors = sorted({cb.monitor for cb in getattr(trainer, "checkpoint_callbacks", []) if cb.monitor})
    return card(
        split_protocol(split, dataset=dataset, variant=dataset_cfg.get("protocol"), image_size=datamodule.image_size),
        model=model or type(net).__name__,
        weights_sha256=weights_hash(net.state_dict()),
        checkpoint=None,
        seed=getattr(datamodule, "seed", None),
        selected_on={"dataset": dataset, "split": split.split, "monitor": monitors, "epoch": int(trainer.current_epoch)},
    )


def checkpoint_card(path: str | os.PathLike) -> dict[str, Any] | None:
    """The card stored in a wakd checkpoint (None for other files and older checkpoints)."""
    if Path(path).suffix in (".safetensors", ".onnx"):
        return None
    content = load_torch_file(path)
    wakd = content.get("wakd") if isinstance(content, dict) else None
    return wakd.get("card") if isinstance(wakd, dict) else None


def evaluation_card(
    cfg: Any, split: PlaceSplit, net: torch.nn.Module, *, pca_fit: str | None, pca_file: str | os.PathLike | None,
    spec: SearchSpec, input_rule: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The card of one eval.py run (``cfg``: its composed config; ``input_rule``: the
    ``image_size``, ``resize`` and ``query_shorter_side`` its images were described at)."""
    onnx = cfg.get("backend") == "onnxruntime"
    ckpt = cfg.get("ckpt")
    stored = None if onnx or not ckpt else checkpoint_card(ckpt)
    return card(
        split_protocol(split, dataset=cfg.dataset.name, variant=cfg.dataset.get("protocol"), **input_rule),
        model=cfg.model.name,
        weights_sha256=file_digest(cfg.backend_model, length=64) if onnx else weights_hash(net.state_dict()),
        checkpoint=str(cfg.backend_model if onnx else ckpt) if (onnx or ckpt) else None,
        seed=int(cfg.seed),
        pca={"fit": pca_fit, "file": str(pca_file)} if pca_fit else None,
        search=search_description(spec),
        selected_on=stored["descriptive"].get("selected_on") if stored else None,
    )
