"""The resolvers the configs use, registered by the entry points (train.py, eval.py,
cluster.py) before Hydra composes: ``${centroid_file:${model},${dataset.name},${seed}}``.
No torch here: train.py checks its start files before torch is imported."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("centroid_file", centroid_file_name, replace=True)


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
    the weights (``weights_tag``) and, for random weights, the seed after K. A head without
    centroids (GeM) gets a name saying so: the key must resolve, but nothing reads the file."""
    net = model.net
    arch = [str(model.name)]
    if net.get("cut") is not None:
        arch.append(str(net.cut))
    if net.get("proj_dim") is not None:
        arch.append(f"p{net.proj_dim}")
    if net.get("input_norm") not in (None, "imagenet"):
        arch.append(f"norm-{net.input_norm}")
    head = net.get("head", "netvlad")
    if head != "netvlad":
        return f"{'_'.join(arch)}_{dataset}_{head}-head-has-no-centroids"
    random_seed = f"_seed{seed}" if model.get("weights") is None else ""
    return (
        f"{'_'.join(arch)}_{dataset}_{net.num_clusters}{weights_tag(model.get('weights'))}"
        f"{random_seed}_desc_cen.hdf5"
    )


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """Short SHA-256 of a file, to key caches and record which teacher was used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
