"""eval.py: Recall@N of a checkpoint (or an untrained / raw-pixel model) on one split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Subset

from wakd.data.datamodule import split_images
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import IMAGENET_MEAN, IMAGENET_STD, build_transform
from wakd.eval.evaluate import Retrieval, evaluate_split
from wakd.eval.extract import extract_descriptors
from wakd.eval.plots import pick_examples, plot_attention, plot_recall_curve, plot_retrievals
from wakd.eval.report import recall_table, write_predictions, write_results
from wakd.jobs.common import (
    build_net,
    ensure_dataset,
    file_digest,
    load_dataset_split,
    model_config_for,
)
from wakd.losses import attention_map
from wakd.models.inference import OnnxDescriptorNet
from wakd.models.pca import PCAWhitening
from wakd.models.place_net import PlaceNet


def _transform(cfg: DictConfig):
    return build_transform(tuple(cfg.dataset.image_size), train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def pca_cache_path(cfg: DictConfig, out_dim: int) -> Path:
    """Beside the checkpoint, keyed by its hash and the PCA settings (log_dir for untrained nets)."""
    source = cfg.dataset.pca_source
    key = f"{source.kind}{source.scale or ''}-{source.split}-{out_dim}-{cfg.pca_max_images}"
    if cfg.ckpt:
        ckpt = Path(cfg.ckpt)
        return ckpt.with_name(f"{ckpt.stem}.pca-{file_digest(ckpt)}-{key}.safetensors")
    return Path(cfg.paths.log_dir) / "pca" / f"untrained-{cfg.model.name}-seed{cfg.seed}-{key}.safetensors"


def fit_pca(net: PlaceNet, cfg: DictConfig) -> PCAWhitening:
    """PCA-whitening fitted on at most ``pca_max_images`` training-split descriptors, cached."""
    source = cfg.dataset.pca_source
    if source.kind == cfg.dataset.kind and source.get("root") == cfg.dataset.root:
        ensure_dataset(cfg.dataset)
    split = load_split(source.kind, source.root, source.split, scale=source.scale)
    images = split_images(split, _transform(cfg))
    n = min(cfg.pca_max_images, len(images))
    out_dim = min(cfg.pca_dim, n - 1, net.descriptor_dim)
    path = pca_cache_path(cfg, out_dim)
    if path.is_file():
        return PCAWhitening.load(path)
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(len(images), size=n, replace=False))
    extraction = extract_descriptors(
        net, Subset(images, chosen.tolist()), batch_size=cfg.batch_size,
        num_workers=cfg.num_workers, desc="describe PCA training images",
    )
    pca = PCAWhitening.fit(torch.from_numpy(extraction.descriptors[extraction.valid]).float(), out_dim)
    pca.save(path)
    return pca


def _thumbnail(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0])))


def save_pictures(
    cfg: DictConfig, out_dir: Path, split: PlaceSplit, result: Retrieval, net: torch.nn.Module, teacher: PlaceNet | None
) -> None:
    thumb = (96, 128)
    positives = split.eval_positives()
    examples = pick_examples(result.topk, positives, num=6, seed=cfg.seed)
    plot_retrievals(
        out_dir / "retrievals.png",
        [_thumbnail(split.q_paths[q], thumb) for q in examples],
        [[_thumbnail(split.db_paths[j], thumb) for j in result.topk[q, :5] if j >= 0] for q in examples],
        [[bool(np.isin(j, positives[q])) for j in result.topk[q, :5] if j >= 0] for q in examples],
        titles=[split.q_rel[q] for q in examples],
    )
    plot_recall_curve(out_dir / "recall_at_n.png", {cfg.model.name: result.recall})
    if isinstance(net, PlaceNet):
        transform = _transform(cfg)
        chosen = examples[:4]
        batch = torch.stack([transform(Image.open(split.q_paths[q]).convert("RGB")) for q in chosen])
        maps = {}
        for name, model in (("model", net), ("teacher", teacher)):
            if model is None:
                continue
            with torch.no_grad():
                features = model.encode(batch).features
            h, w = features.shape[-2:]
            maps[name] = [m.reshape(h, w).numpy() for m in attention_map(features)]
        plot_attention(out_dir / "attention.png", [_thumbnail(split.q_paths[q], thumb) for q in chosen], maps)


def load_eval_net(cfg: DictConfig) -> torch.nn.Module:
    """The network to evaluate: a checkpoint (any supported layout) or an exported ONNX model."""
    if cfg.backend == "onnxruntime":
        if not cfg.backend_model:
            raise ValueError("backend=onnxruntime needs backend_model=PATH.onnx (python -m wakd.export ...)")
        return OnnxDescriptorNet(cfg.backend_model)  # PCA, if any, was exported with it
    if cfg.backend != "torch":
        raise ValueError(f"backend={cfg.backend!r}: choose torch or onnxruntime")
    return build_net(model_config_for(cfg, cfg.ckpt), cfg.ckpt)


def run(cfg: DictConfig) -> dict[int, float]:
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # an untrained network is reproducible per seed
    split = load_dataset_split(cfg.dataset, cfg.split)
    net = load_eval_net(cfg)
    if isinstance(net, PlaceNet) and cfg.ckpt is None:
        # An untrained NetVLAD still needs its centroids: use the clustered ones when present.
        centroids = Path(cfg.centroids)
        if centroids.is_file():
            net.pool.init_from_hdf5(centroids)
    if cfg.pca and isinstance(net, PlaceNet):
        net.pca = fit_pca(net, cfg)
    teacher = build_net(cfg.teacher, cfg.teacher.ckpt) if cfg.get("teacher") else None

    result = evaluate_split(
        net, split, split_images(split, _transform(cfg), cfg.skip_corrupt), ns=cfg.ns,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
    )
    no_positive = int(sum(len(p) == 0 for p in split.eval_positives()))
    write_results(
        out_dir,
        dataset=cfg.dataset.name,
        split=split.split,
        checkpoint=cfg.ckpt,
        num_queries=split.num_queries,
        num_database=split.num_db,
        descriptor_dim=int(result.q_desc.shape[1]),
        recall=result.recall,
        images_per_second=result.images_per_second,
        seconds_total=time.perf_counter() - start,
        queries_without_positive=no_positive,
        skipped_images=result.num_skipped,
        model=cfg.model.name,
    )
    write_predictions(out_dir, split.q_rel, split.db_rel, result.topk, result.distances)
    if cfg.plots:
        save_pictures(cfg, out_dir, split, result, net, teacher)
    print(recall_table({cfg.model.name: result.recall}))
    if no_positive:
        print(f"{no_positive} queries have no database image within {split.eval_radius:g} m (counted as misses)")
    print(f"results written to {out_dir}")
    return result.recall
