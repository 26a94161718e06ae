"""PCA whitening of global descriptors (NetVLAD's 32,768-d -> 4,096-d).

y = normalise(P (x - mu)), with P's rows the top principal directions u_i of the
fitting descriptors, divided by sqrt(lambda_i) when whitening, so that the
projected fitting set has identity covariance on the kept components.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from wakd.atomic import atomic_write_path


def _primal_eig(centred: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-pairs of the covariance C = X^T X / (n-1): values [D] descending, vectors [D, D]."""
    values, vectors = torch.linalg.eigh(centred.T @ centred / (centred.shape[0] - 1))
    return values.flip(0), vectors.flip(1)


def _dual_eig(centred: Tensor) -> tuple[Tensor, Tensor]:
    """Same eigen-pairs from the n x n Gram matrix G = X X^T (cheap when n < D).

    If G v = g v then C (X^T v) = g / (n-1) (X^T v), and |X^T v| = sqrt(g).
    """
    gram_values, gram_vectors = torch.linalg.eigh(centred @ centred.T)
    gram_values, gram_vectors = gram_values.flip(0), gram_vectors.flip(1)
    vectors = centred.T @ gram_vectors / gram_values.clamp_min(1e-300).sqrt()  # [D, n]
    return gram_values / (centred.shape[0] - 1), vectors


class PCAWhitening(nn.Module):
    """Descriptors [B, D] -> L2-normalised, (whitened) PCA projections [B, out_dim]."""

    def __init__(self, mean: Tensor, projection: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())  # [D]
        self.register_buffer("projection", projection.float())  # [out_dim, D]

    @property
    def in_dim(self) -> int:
        return self.projection.shape[1]

    @property
    def out_dim(self) -> int:
        return self.projection.shape[0]

    @classmethod
    def fit(
        cls, descriptors: Tensor, out_dim: int, whiten: bool = True, method: str = "auto"
    ) -> PCAWhitening:
        """Fit on descriptors [n, D] in float64; ``method``: 'auto' (dual if n < D), 'primal', 'dual'."""
        n, dim = descriptors.shape
        if not 0 < out_dim <= min(n - 1, dim):
            raise ValueError(
                f"PCA out_dim={out_dim} is impossible with n={n} descriptors of dimension {dim}: "
                f"centred data has rank at most min(n - 1, D) = {min(n - 1, dim)}; "
                f"fit on more descriptors or lower out_dim"
            )
        if method not in ("auto", "primal", "dual"):
            raise ValueError(f"PCA method={method!r}: choose 'auto', 'primal' or 'dual'")
        x = descriptors.detach().double()
        mean = x.mean(dim=0)
        use_dual = method == "dual" or (method == "auto" and n < dim)
        values, vectors = (_dual_eig if use_dual else _primal_eig)(x - mean)
        values, vectors = values[:out_dim], vectors[:, :out_dim]
        if values[-1] <= values[0] * 1e-12:
            rank = int((values > values[0] * 1e-12).sum())
            raise ValueError(
                f"PCA: the descriptors span only {rank} dimensions, fewer than out_dim={out_dim}; "
                f"lower out_dim or fit on more varied descriptors"
            )
        projection = vectors.T  # [out_dim, D]
        if whiten:
            projection = projection / values.sqrt()[:, None]
        return cls(mean, projection)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize((x - self.mean) @ self.projection.T, dim=-1)

    def save(self, path: str | os.PathLike) -> None:
        """Write mean and projection as safetensors (atomically)."""
        with atomic_write_path(path) as tmp:
            save_file({"mean": self.mean, "projection": self.projection.contiguous()}, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, in_dim: int | None = None) -> PCAWhitening:
        """Read a file written by ``save``; ``in_dim``: the descriptor size it must accept."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PCA file not found: {path}; fit PCA first")
        try:
            tensors = load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: cannot read PCA parameters ({err}); fit PCA again") from None
        if set(tensors) != {"mean", "projection"}:
            raise ValueError(
                f"{path}: expected tensors 'mean' and 'projection', found {sorted(tensors)}"
            )
        pca = cls(tensors["mean"], tensors["projection"])
        if in_dim is not None and pca.in_dim != in_dim:
            raise ValueError(
                f"{path}: PCA expects {pca.in_dim}-d descriptors, the network makes {in_dim}-d "
                "ones (fitted for another model or number of clusters)"
            )
        return pca
