"""The raw-pixel matcher: the floor any learned descriptor has to beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RawPixels(nn.Module):
    """Tiny thumbnail as a descriptor: area downscale, per-image zero mean, L2 norm.

    Subtracting the mean makes the descriptor invariant to a global brightness offset
    (and, with the L2 norm, to a global contrast gain), so it matches layout and colour
    pattern rather than exposure. Works on normalised or raw [0, 1] images alike.
    """

    def __init__(self, size: tuple[int, int] = (24, 32), grayscale: bool = False) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.grayscale = grayscale

    @property
    def descriptor_dim(self) -> int:
        return (1 if self.grayscale else 3) * self.size[0] * self.size[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> descriptors [B, descriptor_dim], unit L2 norm."""
        x = F.interpolate(images.float(), size=self.size, mode="area")
        if self.grayscale:
            x = x.mean(dim=1, keepdim=True)
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        return F.normalize(x, dim=1)
