"""PCA whitening: whitened covariance, unit outputs, primal = dual, file round trip."""

import numpy as np
import pytest
import torch

from wakd.models import PCAWhitening


def _correlated(n, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) * torch.logspace(0, -1, dim)
    return torch.randn(n, dim, generator=generator) @ mixing + 3.0


def _project(pca, x):
    """Projections before the final L2, in float64."""
    return (x.double() - pca.mean.double()) @ pca.projection.double().T


def test_whitened_covariance_is_identity():
    x = _correlated(200, 16)
    pca = PCAWhitening.fit(x, out_dim=6)
    y = _project(pca, x).numpy()
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(6), atol=1e-4)
    # Without whitening: the kept variances are the top eigenvalues of the covariance.
    plain = PCAWhitening.fit(x, out_dim=6, whiten=False)
    expected = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1][:6]
    np.testing.assert_allclose(
        np.var(_project(plain, x).numpy(), axis=0, ddof=1), expected, rtol=1e-4
    )


def test_outputs_are_unit_norm():
    x = _correlated(50, 16)
    out = PCAWhitening.fit(x, out_dim=4)(torch.randn(7, 16))
    assert out.shape == (7, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))


def test_dual_and_primal_agree_up_to_sign():
    x = _correlated(12, 40)  # n < D: 'auto' chooses the dual form
    primal = PCAWhitening.fit(x, out_dim=8, method="primal").projection.double()
    dual = PCAWhitening.fit(x, out_dim=8, method="dual").projection.double()
    auto = PCAWhitening.fit(x, out_dim=8).projection.double()
    signs = torch.sign((primal * dual).sum(dim=1, keepdim=True))
    torch.testing.assert_close(dual * signs, primal, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(auto, dual)


def test_impossible_out_dim_is_explained():
    with pytest.raises(ValueError, match=r"out_dim=12 .* n=12 .* min\(n - 1, D\) = 11"):
        PCAWhitening.fit(torch.randn(12, 40), out_dim=12)
    rank2 = torch.randn(30, 2) @ torch.randn(2, 10)
    with pytest.raises(ValueError, match="span only 2 dimensions"):
        PCAWhitening.fit(rank2, out_dim=4)


def test_save_load_round_trip(tmp_path):
    pca = PCAWhitening.fit(_correlated(30, 16), out_dim=5)
    pca.save(tmp_path / "pca.safetensors")
    loaded = PCAWhitening.load(tmp_path / "pca.safetensors")
    assert torch.equal(loaded.mean, pca.mean) and torch.equal(loaded.projection, pca.projection)
    assert [p.name for p in tmp_path.iterdir()] == ["pca.safetensors"]  # no temp file left
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors: cannot read PCA"):
        PCAWhitening.load(tmp_path / "junk.safetensors")
