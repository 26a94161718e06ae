"""NetVLAD initialisation data: dense local features -> k-means centroids -> HDF5.

The reference ``cluster.py`` clustered pooled outputs; NetVLAD's centroids live
in the space of *dense*, per-location L2-normalised conv features, which is what
is sampled here (docs/method.md, "NetVLAD").
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import faiss
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wakd.atomic import atomic_write_path
from wakd.models.modes import evaluating


@torch.no_grad()
def sample_local_features(
    backbone: nn.Module,
    batches: Iterable[Tensor | tuple | list],
    per_image: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Random dense local features [n, D] (float32, unit L2), ``per_image`` per image.

    ``batches`` yields images [B, 3, H, W] as ``backbone`` takes them (0-1 pixels for a
    wakd ``Backbone``, which normalises them itself), or tuples/lists
    whose first element is that tensor (a DataLoader's (images, index) pairs).
    Images with fewer than ``per_image`` locations contribute all of them.
    """
    rng = np.random.default_rng(seed)
    device = next(backbone.parameters()).device
    samples = []
    with evaluating(backbone):
        for batch in tqdm(batches, desc="local features", unit="batch", disable=not progress):
            images = batch[0] if isinstance(batch, tuple | list) else batch
            features = F.normalize(backbone(images.to(device)), dim=1)  # [B, D, h, w]
            locations = features.flatten(2).transpose(1, 2).float().cpu().numpy()  # [B, h*w, D]
            for image in locations:
                count = min(per_image, len(image))
                samples.append(image[rng.choice(len(image), size=count, replace=False)])
    if not samples:
        raise ValueError("sample_local_features: no images were given")
    return np.concatenate(samples).astype(np.float32, copy=False)


def kmeans_centroids(features: np.ndarray, k: int, seed: int = 0, niter: int = 100) -> np.ndarray:
    """faiss k-means of features [n, D] -> centroids [k, D] (float32), deterministic for a seed."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = features.shape
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} features, got {n}")
    # max_points_per_centroid=n: use every feature (faiss would subsample to 256 k).
    kmeans = faiss.Kmeans(dim, k, niter=niter, seed=seed, max_points_per_centroid=n, verbose=False)
    kmeans.train(features)
    return kmeans.centroids.copy()


def write_centroid_file(
    path: str | os.PathLike, centroids: np.ndarray, descriptors: np.ndarray
) -> None:
    """HDF5 with datasets 'centroids' [K, D] and 'descriptors' [n, D], written atomically."""
    if centroids.ndim != 2 or descriptors.ndim != 2 or centroids.shape[1] != descriptors.shape[1]:
        raise ValueError(
            f"centroids {centroids.shape} and descriptors {descriptors.shape} must be "
            f"[K, D] and [n, D] with the same D"
        )
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("centroids", data=np.asarray(centroids, dtype=np.float32))
        f.create_dataset("descriptors", data=np.asarray(descriptors, dtype=np.float32))
