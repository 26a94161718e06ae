"""Teacher-output cache: the frozen teacher's distillation targets of every training image.

The teacher never changes during distillation, so its targets (intra-normalised VLAD
[K*D] and attention map [h*w], see :func:`wakd.losses.teacher_targets`) are computed once
per fit, in fp16, and the training step looks rows up by global image id instead of
running the teacher on every tuple. Memory is ``(K*D + h*w) * 2`` bytes per image: about
66 KB for VGG16 + NetVLAD-64 at 480x640 (32,768 + 1,200 values), so Pitts30k-train
(7,416 queries + 10,000 database images) takes about 1.1 GB of host memory per process;
the synthetic city takes a few MB.

What the cache sees: each image once, through the evaluation transform (resize to the
training image size, no augmentation; 0-1 pixels, which the teacher normalises as its own
weights expect, whatever the student's normalisation), the teacher in eval mode under
``no_grad``. With
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
from wakd.losses import teacher_targets
from wakd.models.modes import evaluating
from wakd.models.place_net import PlaceNet


class TeacherTargetNet(nn.Module):
    """images [B, 3, H, W] -> [B, K*D + h*w]: a teacher's VLAD and attention targets in one row.

    Shaped like a descriptor network so that the shared extraction code can run it.
    """

    def __init__(self, teacher: PlaceNet, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.teacher = teacher
        self.vlad_dim = teacher.pool.num_clusters * teacher.pool.dim
        with torch.no_grad(), evaluating(teacher):  # the feature-map size at this image size: one probe
            device = next(teacher.parameters()).device
            features = teacher.backbone(torch.zeros(1, 3, *image_size, device=device))
        self.attention_dim = int(features.shape[2] * features.shape[3])

    @property
    def descriptor_dim(self) -> int:
        return self.vlad_dim + self.attention_dim

    def forward(self, images: Tensor) -> Tensor:
        out = self.teacher.encode(images)
        vlad, attention = teacher_targets(out.vlad, out.features)
        return torch.cat([vlad, attention], dim=1)


@dataclass
class TeacherCache:
    """Rows of fp16 targets, row i = global image i (queries, then database images)."""

    table: Tensor  # [N, K*D + h*w] float16, on the host
    vlad_dim: int

    def __len__(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def lookup(self, ids: Tensor, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Targets of images ``ids`` (any shape, flattened): (VLAD [n, K*D], attention [n, h*w]) fp32."""
        rows = self.table.index_select(0, ids.reshape(-1).cpu()).to(device, non_blocking=True).float()
        return rows[:, : self.vlad_dim], rows[:, self.vlad_dim :]


def build_teacher_cache(
    teacher: PlaceNet,
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
    return TeacherCache(table=table, vlad_dim=net.vlad_dim)
