"""Image decoding and transforms shared by training, mining and evaluation."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageLoadError(OSError):
    """An image file is missing, truncated or not an image."""


class ImageTransform:
    """PIL image -> normalised tensor [3, H, W]; remembers its output size for fast decoding."""

    def __init__(self, image_size: tuple[int, int] | None, steps: Sequence[Callable]) -> None:
        self.image_size = image_size  # (H, W), or None to keep each image's size
        self.compose = T.Compose(list(steps))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.compose(image)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, {self.compose})"


def build_transform(
    image_size: tuple[int, int] | None,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    color_jitter: tuple[float, float, float, float] = (0.7, 0.7, 0.7, 0.5),
) -> ImageTransform:
    """Resize to ``image_size`` (H, W), colour-jitter when ``train``, to tensor, normalise."""
    steps: list[Callable] = []
    if image_size is not None:
        steps.append(T.Resize(tuple(image_size)))
    if train:
        steps.append(T.ColorJitter(*color_jitter))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return ImageTransform(None if image_size is None else tuple(image_size), steps)


def load_rgb(path: str | os.PathLike, size_hint: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` as RGB; a JPEG is decoded at reduced scale when ``size_hint`` (H, W) allows.

    Raises ImageLoadError naming the file if it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            if size_hint is not None:
                # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, still >= the target
                image.draft("RGB", (size_hint[1], size_hint[0]))
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


class ImageListDataset(torch.utils.data.Dataset):
    """Images of a list of paths, as (image [3, H, W], index, valid)."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_corrupt: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.image_size: tuple[int, int] | None = getattr(transform, "image_size", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            image = load_rgb(self.paths[i], self.image_size)
        except ImageLoadError as exc:
            if not self.skip_corrupt:
                raise
            log.warning("%s; using a zero image instead", exc)
            height, width = self.image_size or (1, 1)
            return torch.zeros(3, height, width), i, False
        return self.transform(image), i, True
