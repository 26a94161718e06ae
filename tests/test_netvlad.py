"""NetVLAD pooling, SFRS regions, k-means initialisation, and the place network around it."""

import math

import h5py
import numpy as np
import pytest
import torch

from wakd.models import NetVLAD, PCAWhitening, PlaceNet, build_backbone, build_place_net


def _l2(v, axis=-1):
    return v / np.linalg.norm(v, axis=axis, keepdims=True)


def _numpy_vlad(pool, features, mask=None):
    """Unnormalised VLAD [B, K, D] over the locations where mask [H, W] is True."""
    w = pool.conv.weight.detach().double().numpy()[:, :, 0, 0]  # [K, D]
    c = pool.centroids.detach().double().numpy()  # [K, D]
    f = features.double().numpy()
    b, d, h, wd = f.shape
    mask = np.ones((h, wd), bool) if mask is None else mask
    x = _l2(f.reshape(b, d, h * wd).transpose(0, 2, 1))[:, mask.reshape(-1)]  # [B, n, D]
    logits = x @ w.T  # [B, n, K]
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.zeros((b, len(c), d))
    for k in range(len(c)):
        out[:, k] = (a[:, :, k : k + 1] * (x - c[k])).sum(1)
    return out


def _normalise(vlad):
    return _l2(_l2(vlad).reshape(len(vlad), -1))


def _rel_err(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.fixture
def pool():
    torch.manual_seed(0)
    pool = NetVLAD(num_clusters=5, dim=8)
    with torch.no_grad():
        pool.conv.weight.normal_(std=3.0)
        pool.centroids.normal_(std=0.3)
    return pool


def test_forward_matches_numpy(pool):
    features = torch.randn(3, 8, 4, 5)
    with torch.no_grad():
        descriptor = pool(features).double().numpy()
        vlad = pool.vlad(features).double().numpy()
    expected = _numpy_vlad(pool, features)
    assert descriptor.shape == (3, 40)
    assert _rel_err(descriptor, _normalise(expected)) < 1e-5
    assert _rel_err(vlad, _l2(expected)) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(vlad, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(6, 9), (7, 8), (3, 4)])
def test_region_descriptors_match_per_region_loop(pool, height, width):
    features = torch.randn(2, 8, height, width)
    with torch.no_grad():
        regions = pool.region_descriptors(features, grid=3).double().numpy()
        descriptor = pool(features).double().numpy()
    rows = np.array_split(np.arange(height), 3)  # same boundaries as torch.tensor_split
    cols = np.array_split(np.arange(width), 3)
    masks = [np.ones((height, width), bool)]
    for r in rows:
        masks.append(np.zeros((height, width), bool))
        masks[-1][r] = True
    for c in cols:
        masks.append(np.zeros((height, width), bool))
        masks[-1][:, c] = True
    assert regions.shape == (2, 7, 40)
    for i, mask in enumerate(masks):
        expected = _normalise(_numpy_vlad(pool, features, mask))
        assert _rel_err(regions[:, i], expected) < 1e-5, i
    np.testing.assert_allclose(regions[:, 0], descriptor, atol=1e-6)


def test_region_grid_larger_than_map_is_rejected(pool):
    with pytest.raises(ValueError, match="2x5 is smaller than the 3x3"):
        pool.region_descriptors(torch.randn(1, 8, 2, 5))


def _write_hdf5(path, centroids, descriptors):
    with h5py.File(path, "w") as f:
        f["centroids"] = np.asarray(centroids, np.float32)
        f["descriptors"] = np.asarray(descriptors, np.float32)


def test_init_from_hdf5_alpha_by_hand(tmp_path):
    # Normalised centroids are e1, e2. Descriptor (1, 0): top1 - top2 = 1 - 0;
    # (0.6, 0.8): 0.8 - 0.6 = 0.2. Mean gap 0.6 -> alpha = ln(100) / 0.6.
    _write_hdf5(tmp_path / "c.hdf5", [[2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.6, 0.8]])
    pool = NetVLAD(num_clusters=2, dim=2)
    pool.init_from_hdf5(tmp_path / "c.hdf5")
    alpha = math.log(100) / 0.6
    assert torch.allclose(pool.centroids, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    expected = torch.tensor([[alpha, 0.0], [0.0, alpha]])[:, :, None, None]
    assert torch.allclose(pool.conv.weight, expected, rtol=1e-6)


def test_init_from_hdf5_wrong_size_names_both(tmp_path):
    _write_hdf5(tmp_path / "c.hdf5", np.eye(4, 8), np.eye(3, 8))
    with pytest.raises(ValueError, match=r"K=4 x D=8.*K=5 x D=8"):
        NetVLAD(num_clusters=5, dim=8).init_from_hdf5(tmp_path / "c.hdf5")
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f["centroids"] = np.eye(5, 8)
    with pytest.raises(ValueError, match=r"bad\.hdf5: no dataset 'descriptors'"):
        NetVLAD(num_clusters=5, dim=8).init_from_hdf5(tmp_path / "bad.hdf5")


def test_place_net_paths_agree():
    torch.manual_seed(0)
    net = build_place_net("resnet18", num_clusters=4).eval()
    images = torch.randn(2, 3, 96, 96)  # 6x6 map at stride 16
    with torch.no_grad():
        deployed = net(images)
        plain = net.encode(images)
        with_regions = net.encode(images, regions=True)
    assert net.descriptor_dim == 4 * 256 == deployed.shape[1]
    assert plain.features.shape == (2, 256, 6, 6) and plain.regions is None
    assert torch.allclose(plain.descriptor, deployed, atol=1e-6)
    assert torch.allclose(with_regions.descriptor, deployed, atol=1e-6)
    assert torch.allclose(with_regions.vlad, plain.vlad, atol=1e-6)
    assert with_regions.regions.shape == (2, 7, 1024)


def test_place_net_applies_pca_and_checks_dims():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    pool = NetVLAD(num_clusters=2, dim=256)
    pca = PCAWhitening.fit(torch.randn(20, 512), out_dim=8)
    net = PlaceNet(backbone, pool, pca).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(images)
        assert torch.allclose(out, pca(net.encode(images).descriptor))
    assert out.shape == (2, 8) == (2, net.descriptor_dim)
    with pytest.raises(ValueError, match=r"dim=512 does not match .* 256"):
        PlaceNet(backbone, NetVLAD(2, 512))
