"""The frozen teacher's distillation targets, live or from a cache of every training image.

A teacher gives per image the rows of the similarity Gram and a spatial map
(:func:`teacher_targets_of`): a wakd PlaceNet its intra-normalised VLAD [K*D] (its
descriptor [D] when it has no NetVLAD) and the attention map of its last feature map
[h, w]; a published model (:class:`wakd.zoo.ZooTeacher`) its descriptor and its family's map.

The teacher never changes during distillation, so the cache computes these once per fit,
in fp16, and the training step looks rows up by global image id instead of running the
teacher on every tuple. Memory is ``(L + h*w) * 2`` bytes per image (L the Gram rows'
length): about 66 KB for VGG16 + NetVLAD-64 at 480x640 (32,768 + 1,200 values), so
Pitts30k-train (7,416 queries + 10,000 database images) takes about 1.1 GB of host memory
per process; a DINOv2-B teacher at 322x322 (23x23 patches) 18 KB with SALAD (8,448 + 529),
26 KB with BoQ (12,288 + 529); the synthetic city a few MB.

What the cache sees: each image once, through the evaluation transform (resize to the
training image size, no augmentation; 0-1 pixels, which the teacher normalises as its own
weights expect, whatever the student's normalisation; a published teacher then resizes them
to its own size, as in the live step), the teacher in eval mode under ``no_grad``. With
training augmentation on, the cached target is therefore that of the un-augmented view,
while the live teacher would see the same jittered image as the student.

Extraction reuses :func:`wakd.describe.extract_descriptors`: under DDP each rank
describes a strided shard and the shards are all-gathered, so every rank ends with the
whole cache. The cache is not stored in checkpoints: a resumed fit recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wakd.describe import extract_descriptors
from wakd.losses import attention_map, intra_normalised_vlad
from wakd.models.modes import evaluating
from wakd.zoo import ZooTeacher


@torch.no_grad()
def teacher_targets_of(teacher: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """Images [N, 3, H, W] -> (Gram rows [N, L], spatial map [N, h, w] in [0, 1] or None).

    Both in [-1, 1], so fp16 storage loses ~1e-3.
    """
    if isinstance(teacher, ZooTeacher):
        descriptor, spatial_map = teacher.targets(images)
        return descriptor, spatial_map
    out = teacher.encode(images)
    rows = intra_normalised_vlad(out.vlad) if out.vlad is not None else out.descriptor
    n, _, h, w = out.features.shape
    return rows, attention_map(out.features).view(n, h, w)


class TeacherTargetNet(nn.Module):
    """images [B, 3, H, W] -> [B, L + h*w]: a teacher's Gram rows and map in one row.

    Shaped like a descriptor network so that the shared extraction code can run it.
    """

    def __init__(self, teacher: nn.Module, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.teacher = teacher
        with evaluating(teacher):  # the sizes at this image size: one probe
            device = next(teacher.parameters()).device
            rows, spatial_map = teacher_targets_of(teacher, torch.zeros(1, 3, *image_size, device=device))
        self.similarity_dim = rows.shape[1]
        self.map_size = tuple(spatial_map.shape[1:]) if spatial_map is not None else None

    @property
    def descriptor_dim(self) -> int:
        return self.similarity_dim + (self.map_size[0] * self.map_size[1] if self.map_size else 0)

    def forward(self, images: Tensor) -> Tensor:
        rows, spatial_map = teacher_targets_of(self.teacher, images)
        return rows if spatial_map is None else torch.cat([rows, spatial_map.flatten(1)], dim=1)


@dataclass
class TeacherCache:
    """Rows of fp16 targets, row i = global image i (queries, then database images)."""

    table: Tensor  # [N, L + h*w] float16, on the host
    similarity_dim: int  # L
    map_size: tuple[int, int] | None  # (h, w); None for a teacher without a map

    def __len__(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def lookup(self, ids: Tensor, device: torch.device | str) -> tuple[Tensor, Tensor | None]:
        """Targets of images ``ids`` (any shape, flattened): (Gram rows [n, L], map [n, h, w] or None) fp32."""
        rows = self.table.index_select(0, ids.reshape(-1).cpu()).to(device, non_blocking=True).float()
        if self.map_size is None:
            return rows, None
        return rows[:, : self.similarity_dim], rows[:, self.similarity_dim :].view(-1, *self.map_size)


def build_teacher_cache(
    teacher: nn.Module,
    images: Dataset,
    image_size: tuple[int, int],
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TeacherCache:
    """Describe every item of ``images`` (items ``(image, index, valid)``) with ``teacher``.

    Eager fp32 (no ONNX path), so that cached and live targets differ only by fp16 rounding.
    """
    net = TeacherTargetNet(teacher, tuple(image_size))
    extraction = extract_descriptors(
        net,
        images,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        desc="teacher cache",
        progress=progress,
        optimize=False,
    )
    table = torch.from_numpy(np.ascontiguousarray(extraction.descriptors))
    return TeacherCache(table=table, similarity_dim=net.similarity_dim, map_size=net.map_size)
