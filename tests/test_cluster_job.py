"""cluster.py on the tiny synthetic city: file layout, shapes, determinism."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from conftest import compose_cfg

from wakd.jobs import cluster

OVERRIDES = [
    "dataset=synthcity",
    "dataset.image_size=[64,86]",
    "dataset.generate.preset=tiny",
    "model=resnet18", "model.weights=null",
    "model.net.num_clusters=8",
    "cluster.num_images=12",
    "cluster.features_per_image=10",
]


def test_cluster_writes_deterministic_centroid_file(tiny_data_dir: Path, tmp_path: Path) -> None:
    files = []
    for run in ("a", "b"):
        cfg = compose_cfg("cluster", [*OVERRIDES, f"paths.cluster_dir={tmp_path / run}"], tiny_data_dir, tmp_path / run)
        files.append(cluster.run(cfg))
    assert files[0].name == "resnet18_layer3_synthcity_8_seed0_desc_cen.hdf5"
    with h5py.File(files[0]) as a, h5py.File(files[1]) as b:
        assert a["centroids"].shape == (8, 256)
        assert a["descriptors"].shape == (12 * 10, 256)  # dense local features, not pooled outputs
        np.testing.assert_allclose(np.linalg.norm(a["descriptors"][:], axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(a["centroids"][:], b["centroids"][:])
    assert not list(tmp_path.glob("**/*.tmp"))


def test_centroid_file_is_keyed_by_the_weights(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Centroids clustered on pretrained weights must not initialise a random network, or
    the reverse: the weights file's digest is part of the name."""
    import torch

    from wakd.models import build_place_net

    weights = tmp_path / "pretrained.pt"
    torch.save(build_place_net("resnet18", num_clusters=8).state_dict(), weights)
    overrides = [*OVERRIDES, f"paths.cluster_dir={tmp_path / 'clusters'}"]
    random_init = compose_cfg("cluster", overrides, tiny_data_dir, tmp_path / "a")
    pretrained = compose_cfg("cluster", [*overrides, f"model.weights={weights}"], tiny_data_dir, tmp_path / "b")
    assert Path(random_init.centroids).name == "resnet18_layer3_synthcity_8_seed0_desc_cen.hdf5"
    name = Path(pretrained.centroids).name
    assert name.startswith("resnet18_layer3_synthcity_8_pretrained-") and name.endswith("_desc_cen.hdf5")
    torch.save(build_place_net("resnet18", num_clusters=8).state_dict(), weights)  # other weights
    assert Path(compose_cfg("cluster", [*overrides, f"model.weights={weights}"], tiny_data_dir,
                            tmp_path / "c").centroids).name != name


def test_centroid_file_is_keyed_by_cut_projection_and_random_seed(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Each of these changes the dense features k-means sees, so each must change the name."""
    def name(*overrides: str) -> str:
        cfg = compose_cfg("cluster", [*OVERRIDES, *overrides], tiny_data_dir, tmp_path / "x")
        return Path(cfg.centroids).name

    base = name()
    variants = {name("model.net.cut=layer4"), name("model.net.proj_dim=64"), name("seed=1")}
    assert base not in variants and len(variants) == 3
    assert name("model=vgg16", "model.weights=imagenet") == "vgg16_synthcity_8_imagenet_desc_cen.hdf5"
