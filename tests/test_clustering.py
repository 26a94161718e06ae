"""Dense feature sampling, faiss k-means, and the centroid HDF5 file."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from wakd.models import (
    NetVLAD,
    kmeans_centroids,
    sample_local_features,
    write_centroid_file,
)


def _backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8))  # 16x16 -> 4x4


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, 16, 16, generator=generator) for _ in range(2)]


def test_samples_are_dense_normalised_locations():
    backbone = _backbone().train()
    batches = _batches()
    sampled = sample_local_features(backbone, batches, per_image=5, progress=False)
    assert sampled.shape == (30, 8) and sampled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sampled, axis=1), 1.0, atol=1e-5)
    assert backbone.training  # mode restored
    with torch.no_grad():
        dense = nn.functional.normalize(backbone.eval()(batches[0][:1]), dim=1)
    first_image = dense[0].flatten(1).T.numpy()  # [16, 8]
    distances = np.linalg.norm(sampled[:5, None] - first_image[None], axis=-1)
    assert distances.min(axis=1).max() < 1e-5  # every sample is one of its image's locations
    assert len(np.unique(distances.argmin(axis=1))) == 5  # without replacement


def test_sampling_is_seeded_and_takes_all_when_few():
    backbone, batches = _backbone(), _batches()
    first = sample_local_features(backbone, batches, per_image=5, seed=3, progress=False)
    again = sample_local_features(backbone, iter(batches), per_image=5, seed=3, progress=False)
    other = sample_local_features(backbone, batches, per_image=5, seed=4, progress=False)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    pairs = [(images, torch.arange(3)) for images in batches]  # DataLoader-style batches
    everything = sample_local_features(backbone, pairs, per_image=100, progress=False)
    assert everything.shape == (6 * 16, 8)


def test_kmeans_finds_separated_clusters_deterministically():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 6, dtype=np.float32) * 10
    points = (centres[rng.integers(0, 4, 400)] + rng.normal(0, 0.1, (400, 6))).astype(np.float32)
    first = kmeans_centroids(points, k=4, seed=7, niter=20)
    second = kmeans_centroids(points, k=4, seed=7, niter=20)
    assert first.shape == (4, 6)
    np.testing.assert_array_equal(first, second)
    nearest = np.linalg.norm(first[:, None] - centres[None], axis=-1).min(axis=0)
    assert nearest.max() < 0.1  # each true centre found
    with pytest.raises(ValueError, match="k=5 needs at least 5"):
        kmeans_centroids(points[:4], k=5)


def test_centroid_file_layout_and_atomic_write(tmp_path):
    name = "vgg16_pitts30k_4_desc_cen.hdf5"
    path = tmp_path / name
    path.write_text("stale")
    centroids = np.random.default_rng(0).normal(size=(4, 8))
    descriptors = np.random.default_rng(1).normal(size=(20, 8))
    write_centroid_file(path, centroids, descriptors)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # replaced, no temp file left
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["centroids", "descriptors"]
        assert f["centroids"].dtype == np.float32 and f["descriptors"].shape == (20, 8)
        np.testing.assert_allclose(f["centroids"][:], centroids, rtol=1e-6)
    NetVLAD(num_clusters=4, dim=8).init_from_hdf5(path)  # readable by its consumer
    with pytest.raises(ValueError, match="same D"):
        write_centroid_file(tmp_path / "bad.hdf5", centroids, descriptors[:, :5])
    # Failing half-way (centroids written, descriptors not) keeps the previous file.
    with pytest.raises(ValueError, match="could not convert"):
        write_centroid_file(path, centroids * 0, np.full((20, 8), "x"))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with h5py.File(path, "r") as f:
        np.testing.assert_allclose(f["centroids"][:], centroids, rtol=1e-6)
