"""The raw-pixel matcher: the floor any learned descriptor has to beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wakd.models.normalization import InputNorm, input_normalization


class RawPixels(nn.Module):
    """Tiny thumbnail as a descriptor: area downscale, per-image zero mean, L2 norm.

    Subtracting the mean makes the descriptor invariant to a global brightness offset
    (and, with the L2 norm, to a global contrast gain), so it matches layout and colour
    pattern rather than exposure. Takes 0-1 pixels like every wakd network and first
    applies ``input_norm``: ImageNet's per-channel scale, which the data pipelines applied
    before models normalised their own input, so the descriptors (and Recall) stay the same.
    """

    def __init__(
        self, size: tuple[int, int] = (24, 32), grayscale: bool = False, input_norm: InputNorm = "imagenet"
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.grayscale = grayscale
        self.normalize = input_normalization(input_norm)

    @property
    def descriptor_dim(self) -> int:
        return (1 if self.grayscale else 3) * self.size[0] * self.size[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> descriptors [B, descriptor_dim], unit L2 norm."""
        x = F.interpolate(self.normalize(images.float()), size=self.size, mode="area")
        if self.grayscale:
            x = x.mean(dim=1, keepdim=True)
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        return F.normalize(x, dim=1)
