"""Image decoding and transforms shared by training, mining and evaluation.

Images leave here as float32 RGB in [0, 1], never normalised: each network normalises
its input itself, as its weights expect (``wakd.models.normalization``).
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)


class ImageLoadError(OSError):
    """An image file is missing, truncated or not an image."""


class ImageTransform:
    """PIL image -> float32 tensor [3, H, W] in [0, 1]; remembers its output size for fast
    decoding.

    Two stages, so that extraction can keep the float work out of DataLoader workers:
    ``to_uint8`` (the PIL steps, i.e. resize and colour jitter, then a uint8 tensor) and
    ``to_float`` (uint8 images or batches -> float32 ``x / 255``, the very arithmetic of
    ``ToTensor``, so bit-identical to it). A transform is ``to_float(to_uint8(image))``.
    """

    def __init__(
        self,
        image_size: tuple[int, int] | None,
        steps: Sequence[Callable[[Image.Image], Image.Image]],
        draft: bool = True,
    ) -> None:
        self.image_size = image_size  # (H, W), or None to keep each image's size
        self.compose = T.Compose(list(steps))  # PIL -> PIL
        # JPEGs may be decoded at 1/2-1/8 scale before the resize (load_rgb); False decodes in
        # full first, as published models' authors do.
        self.draft = draft

    @property
    def only_resizes(self) -> bool:
        """True when the PIL steps do nothing but resize to ``image_size`` (evaluation), or
        nothing at all: an image already at ``image_size`` then passes through unchanged. A
        shorter-side resize (no fixed ``image_size``) does not."""
        steps = self.compose.transforms
        return all(isinstance(step, T.Resize) for step in steps) and (self.image_size is not None or not steps)

    def to_uint8(self, image: Image.Image, contiguous: bool = True) -> torch.Tensor:
        """The PIL steps, then uint8 [3, H, W]. ``contiguous=False`` returns a CHW view of
        HWC memory: ``torch.stack`` (DataLoader collation) lays it out in its one copy."""
        image = self.compose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return chw.contiguous() if contiguous else chw

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_float(self.to_uint8(image))

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, {self.compose}, to_float)"


def to_float(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 ``images / 255`` (``ToTensor``'s arithmetic), in
    a new tensor or in ``out`` (float32, same shape: reusing it saves fresh pages per batch)."""
    floats = images.to(torch.float32) if out is None else out.copy_(images)
    return floats.div_(255)


RESIZE_MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def build_transform(
    image_size: tuple[int, int] | int | None,
    train: bool,
    color_jitter: tuple[float, float, float, float] = (0.7, 0.7, 0.7, 0.5),
    resize: str = "bilinear",
    draft: bool = True,
) -> ImageTransform:
    """Resize to ``image_size`` (H, W; one int: the shorter side, aspect kept) with PIL's
    ``resize`` filter ('bilinear' | 'bicubic'; 'none' keeps each image's size),
    colour-jitter when ``train``, to a 0-1 float tensor. ``draft=False`` decodes JPEGs in
    full before resizing (see ``ImageTransform``)."""
    if resize == "none":
        image_size = None
    elif resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: choose one of {', '.join([*RESIZE_MODES, 'none'])}")
    steps: list[Callable[[Image.Image], Image.Image]] = []
    if isinstance(image_size, int):  # sizes differ between images: no fixed size to decode at
        steps.append(T.Resize(image_size, interpolation=RESIZE_MODES[resize]))
        return ImageTransform(None, steps, draft=False)
    if image_size is not None:
        steps.append(T.Resize(tuple(image_size), interpolation=RESIZE_MODES[resize]))
    if train:
        steps.append(T.ColorJitter(*color_jitter))
    return ImageTransform(None if image_size is None else tuple(image_size), steps, draft)


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


def decode_jpeg_at_size(path: str | os.PathLike, size: tuple[int, int] | None) -> torch.Tensor | None:
    """uint8 [3, H, W] of a JPEG stored at ``size`` (H, W; None: any) in RGB or grayscale,
    decoded by torchvision (libjpeg-turbo straight into a tensor: 0.7 ms against PIL's
    1.5 ms with the array conversion at 480x640, same pixels); None for any other file,
    which PIL then decodes. The file is read once; PIL reads its header (no decoding).
    Raises ImageLoadError for a corrupt JPEG."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        with Image.open(io.BytesIO(data)) as image:
            # CMYK / YCCK JPEGs (PIL mode CMYK) are left to PIL, which converts them.
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if size is not None and (image.height, image.width) != tuple(size):
                return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # load_rgb names the problem
    try:
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


class TensorImageDataset(torch.utils.data.Dataset):
    """Images already decoded in memory [N, 3, H, W] (0-1 floats), as ImageListDataset's
    items ``(image, index, valid)``: for extraction from tensors (benchmarks, tests)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        return self.images[i], i, True


class ImageListDataset(torch.utils.data.Dataset):
    """Images of a list of paths, as (image [3, H, W], index, valid).

    ``uint8=True`` (needs an ``ImageTransform``): images stay uint8 and ``to_float``
    finishes them, batched (see ``uint8_images``).
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_corrupt: bool = False,
        uint8: bool = False,
    ) -> None:
        if uint8 and not isinstance(transform, ImageTransform):
            raise TypeError(f"uint8 images need an ImageTransform, not {transform!r}")
        self.paths = list(paths)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.uint8 = uint8
        self.image_size: tuple[int, int] | None = getattr(transform, "image_size", None)

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The size JPEGs may be draft-decoded towards (None: decode in full)."""
        return self.image_size if getattr(self.transform, "draft", True) else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        try:
            if self.uint8 and self.transform.only_resizes:  # type: ignore[attr-defined]
                decoded = decode_jpeg_at_size(self.paths[i], self.image_size)
                if decoded is not None:
                    return decoded, i, True
            image = load_rgb(self.paths[i], self.draft_size)
        except ImageLoadError as exc:
            if not self.skip_corrupt:
                raise
            log.warning("%s; using a zero image instead", exc)
            height, width = self.image_size or (1, 1)
            dtype = torch.uint8 if self.uint8 else torch.float32
            return torch.zeros(3, height, width, dtype=dtype), i, False
        if self.uint8:
            return self.transform.to_uint8(image, contiguous=False), i, True  # type: ignore[attr-defined]
        return self.transform(image), i, True


def uint8_images(dataset: Dataset) -> Dataset | None:
    """A copy of ``dataset`` whose images come uint8: ``to_float(uint8 batch)`` equals the
    batch of ``dataset`` exactly (apart from skipped corrupt images: zero there too).

    Decoding to uint8 and converting the batch in the consumer cuts a DataLoader
    worker's float work and its traffic to the main process fourfold
    (bench/p2_extraction.py). ``dataset`` is an ``ImageListDataset`` with an
    ``ImageTransform``, or ``Subset`` / ``ConcatDataset`` of such; anything else gives
    None (use ``dataset`` as it is).
    """
    if isinstance(dataset, ImageListDataset) and isinstance(dataset.transform, ImageTransform):
        raw = copy.copy(dataset)
        raw.uint8 = True
        return raw
    if isinstance(dataset, Subset):
        inner = uint8_images(dataset.dataset)
        return None if inner is None else Subset(inner, dataset.indices)
    if isinstance(dataset, ConcatDataset):
        parts = [uint8_images(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else type(dataset)(parts)  # type: ignore[arg-type]
    return None


class ConcatImages(ConcatDataset):
    """Image lists one after another, items ``(image, index, valid)`` with the index in the
    whole (ConcatDataset alone keeps each list's own): validation collects descriptors by it."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image, _, valid = super().__getitem__(i)
        return image, i, valid


def cpu_workers(num_workers: int) -> int:
    """DataLoader workers for extraction on the CPU: at most one per core the forward's
    ``torch.get_num_threads()`` threads leave free, so none on a 2-core machine with 2
    threads: decoding inline there reached 0.85 of the bare forward at 480x640 against
    0.69 with one worker and 0.68 with two (bench/p2_extraction.py; similar on 96x128)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = max(0, cores - torch.get_num_threads())
    if num_workers > limit:
        log.debug("extraction on the CPU: %d DataLoader workers instead of %d", limit, num_workers)
    return min(num_workers, limit)


def extraction_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device | str
) -> DataLoader:
    """In-order batches of ``dataset`` (items ``(image, index, valid)``) for describing it.

    Images of ``ImageListDataset``s (also inside ``Subset`` / ``ConcatDataset``) come uint8
    (``uint8_images``): the consumer converts them with ``to_float``, batched. On the CPU the
    forward already uses ``torch.get_num_threads()`` cores, so at most ``cpu_workers``
    workers run: a worker on a busy core only steals cycles from the forward, and decoding
    inline is cheaper.
    """
    device = torch.device(device)
    if device.type == "cpu":
        num_workers = cpu_workers(num_workers)
    raw = uint8_images(dataset)
    return DataLoader(
        raw if raw is not None else dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
