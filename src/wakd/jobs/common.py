"""Pieces the train / eval / cluster jobs share: dataset presence, model building."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from wakd.data.datasets import PlaceSplit, load_split
from wakd.distributed import external_launcher
from wakd.models.checkpoints import load_place_net_weights, load_torch_file


def ensure_dataset(dataset: DictConfig) -> None:
    """Generate the synthetic city on first use; real datasets must already be in place."""
    if dataset.kind != "synthcity" or Path(dataset.root).is_dir():
        return
    generate = dataset.get("generate") or {}
    out_dir = Path(dataset.root).parents[1]  # <data_dir>/synthcity/raw -> <data_dir>
    launched = external_launcher()
    if launched is not None:  # every process would render the same files at once
        raise ValueError(
            f"dataset.root {dataset.root} does not exist and {launched[0]} started {launched[1]} "
            f"processes: generate the city once first (python -m wakd.data.synthcity --out {out_dir} "
            f"--preset {generate.get('preset', 'demo')} --seed {int(generate.get('seed', 0))})"
        )
    from wakd.data.synthcity import generate_city

    generate_city(out_dir, preset=generate.get("preset", "demo"), seed=int(generate.get("seed", 0)))


def load_dataset_split(dataset: DictConfig, which: str) -> PlaceSplit:
    """The split used for ``which`` in {train, val, test} (names as the dataset config maps them)."""
    split = dataset.splits[which]
    if split is None:
        raise ValueError(f"dataset '{dataset.name}' has no {which} split (it is evaluation-only)")
    ensure_dataset(dataset)
    return load_split(
        dataset.kind, dataset.root, split,
        scale=dataset.get("scale"), pos_dist_thr=dataset.get("pos_dist_thr"),
    )


def weights_tag(weights: str | None) -> str:
    """Part of a centroid file's name saying which weights its features came from: '' for
    random weights (the reference's name), '_imagenet', or '_<stem>-<sha256[:8]>' of a
    file. Centroids clustered on one set of weights must never initialise another."""
    if weights is None:
        return ""
    path = Path(weights)
    if not path.is_file():  # 'imagenet', or a missing file that building the model reports
        return f"_{path.stem}"
    return f"_{path.stem}-{file_digest(path, 8)}"


def centroid_file_name(model: DictConfig, dataset: str, seed: int) -> str:
    """NetVLAD centroid file for ``model`` on ``dataset``, named by everything that decides
    its dense features: the reference's ``{arch}_{dataset}_{K}_desc_cen.hdf5`` with the
    cut, the projection width and a non-ImageNet input normalisation after the arch, and
    the weights (``weights_tag``) and, for random weights, the seed after K."""
    net = model.net
    arch = [str(model.name)]
    if net.get("cut") is not None:
        arch.append(str(net.cut))
    if net.get("proj_dim") is not None:
        arch.append(f"p{net.proj_dim}")
    if net.get("input_norm") not in (None, "imagenet"):
        arch.append(f"norm-{net.input_norm}")
    random_seed = f"_seed{seed}" if model.get("weights") is None else ""
    return (
        f"{'_'.join(arch)}_{dataset}_{net.num_clusters}{weights_tag(model.get('weights'))}"
        f"{random_seed}_desc_cen.hdf5"
    )


# Config files name centroid files with ${centroid_file:${model},${dataset.name},${seed}}.
OmegaConf.register_new_resolver("centroid_file", centroid_file_name, replace=True)


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """Short SHA-256 of a file, to key caches and record which teacher was used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def checkpoint_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model config a wakd checkpoint was trained with (None for foreign checkpoints)."""
    if Path(path).suffix == ".safetensors":  # tensors only: no place for a model config
        return None
    state = load_torch_file(path)  # refuses pickled code (ValueError) instead of running it
    if isinstance(state, dict) and isinstance(state.get("wakd"), dict):
        return state["wakd"].get("model") or None
    return None


def build_net(model_cfg: DictConfig | dict, ckpt: str | None = None) -> torch.nn.Module:
    """Instantiate a descriptor network and load ``ckpt`` into it (any supported layout)."""
    net_cfg = model_cfg.get("net", model_cfg)
    overrides = {"weights": None} if ckpt and "weights" in net_cfg else {}
    # With a checkpoint every weight is overwritten: never load ImageNet/pretraining files first.
    net = hydra.utils.instantiate(net_cfg, **overrides)
    if ckpt:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        load_place_net_weights(net, ckpt)
    return net


def model_config_for(cfg: DictConfig, ckpt: str | None) -> DictConfig:
    """Prefer the architecture stored in a wakd checkpoint over the command line's ``model``."""
    stored = checkpoint_model_config(ckpt) if ckpt else None
    return OmegaConf.create(stored) if stored else cfg.model


