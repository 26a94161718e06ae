"""cluster.py: k-means centroids of dense local features for NetVLAD initialisation (a GeM
head has none: clustering refuses it, initialisation skips it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from wakd.data.images import ImageListDataset, build_transform
from wakd.jobs.common import load_dataset_split
from wakd.models.clustering import kmeans_centroids, sample_local_features, write_centroid_file
from wakd.models.place_net import PlaceNet


def compute_centroids(
    net: PlaceNet,
    dataset: DictConfig,
    out_path: str | Path,
    *,
    num_images: int = 500,
    features_per_image: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    num_workers: int = 2,
    skip_corrupt: bool = False,
) -> Path:
    """500 random training images (queries + database) -> 100 dense features each -> k-means."""
    if not net.has_netvlad:
        raise ValueError(
            f"the model's head is {type(net.pool).__name__}, which has no centroids: there is "
            "nothing to cluster (cluster.py initialises NetVLAD only, model/head=netvlad); "
            "train.py and eval.py need no centroid file for it"
        )
    split = load_dataset_split(dataset, "train")
    paths = [*split.q_paths, *split.db_paths]
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(num_images, len(paths)), replace=False)
    transform = build_transform(tuple(dataset.image_size), train=False)
    images = Subset(ImageListDataset(paths, transform, skip_corrupt=skip_corrupt), sorted(chosen.tolist()))
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    with torch.no_grad():
        features = sample_local_features(
            net.backbone, (images[valid] for images, _, valid in loader), per_image=features_per_image, seed=seed
        )
    centroids = kmeans_centroids(features, net.pool.num_clusters, seed=seed)
    out_path = Path(out_path)
    write_centroid_file(out_path, centroids, features)
    return out_path


def init_netvlad(net: PlaceNet, centroids: str | Path, cluster: Callable[[Path], object] | None = None) -> None:
    """NetVLAD of ``net`` from the k-means file ``centroids``: train.py has ``cluster`` write
    it first when it is missing; eval.py evaluates an untrained network without one as it is
    (random centroids). Another head (GeM) has no centroids: nothing to do."""
    if not net.has_netvlad:
        return
    centroids = Path(centroids)
    if not centroids.is_file():
        if cluster is None:
            return
        cluster(centroids)
    net.pool.init_from_hdf5(centroids)


def run(cfg: DictConfig) -> Path:
    torch.manual_seed(cfg.seed)  # a randomly initialised backbone is reproducible too
    net = hydra.utils.instantiate(cfg.model.net)
    path = compute_centroids(
        net,
        cfg.dataset,
        cfg.centroids,
        num_images=cfg.cluster.num_images,
        features_per_image=cfg.cluster.features_per_image,
        seed=cfg.seed,
    )
    print(f"centroids written to {path}")
    return path
