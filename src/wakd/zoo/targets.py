"""What WAKD distils from a published model: its descriptor and a spatial map per image.

Every zoo model has ``distill_targets(images) -> DistillTargets``: the descriptor it
publishes [B, D] and a map [B, h, w] over its own feature grid, >= 0 with maximum 1 per image
(docs/method.md, section 5, "Distilling from any teacher"):

* CNN families (CosPlace, EigenPlaces, OpenIBL, DVGLB, pytorch-NetVlad, MixVPR): the
  closed-form Grad-CAM of the last feature map, :func:`wakd.losses.attention_map`, the very
  map WAKD takes from its NetVLAD teacher;
* SALAD and MegaLoc: the transport mass each patch gives the clusters (not the dustbin),
  :func:`transport_map`;
* BoQ: the cross-attention of its learned queries over the tokens, averaged over queries
  and blocks, :func:`attention_weights_map`.

:class:`ZooTeacher` shows a published model to training at its own image size.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F

from wakd.losses import attention_map

__all__ = ["DistillTargets", "ZooTeacher", "activation_targets", "attention_weights_map", "transport_map"]

# Maps whose maximum is below this stay (near) zero instead of dividing noise up to 1.
_EPS = 1e-8


class DistillTargets(NamedTuple):
    descriptor: Tensor  # [B, D], the published descriptor
    spatial_map: Tensor | None  # [B, h, w] in [0, 1]; None where a family defines none


def max_normalised(maps: Tensor) -> Tensor:
    """[B, h, w] non-negative -> each map divided by its maximum."""
    return maps / maps.flatten(1).amax(dim=1).clamp_min(_EPS)[:, None, None]


def activation_targets(features: Tensor, descriptor: Tensor) -> DistillTargets:
    """The descriptor and the Grad-CAM map of the feature map [B, C, h, w] it was pooled from."""
    batch, _, height, width = features.shape
    return DistillTargets(descriptor, attention_map(features).view(batch, height, width))


def transport_map(weights: Tensor, height: int, width: int) -> Tensor:
    """SALAD's Sinkhorn assignment [B, m, h*w] (dustbin dropped) -> [B, h, w]: the mass each
    patch sends to the m clusters; a patch the dustbin takes counts for nothing."""
    return max_normalised(weights.sum(dim=1).view(-1, height, width))


def attention_weights_map(weights: list[Tensor], height: int, width: int) -> Tensor:
    """BoQ's cross-attention weights, one [B, Q, h*w] per block -> [B, h, w]: how much the
    queries look at each location, averaged over queries and blocks."""
    mean = sum(w.mean(dim=1) for w in weights) / len(weights)  # [B, h*w]
    return max_normalised(mean.view(-1, height, width))


class ZooTeacher(nn.Module):
    """A published model as a frozen WAKD teacher: 0-1 images at the student's size
    [B, 3, H, W] are resized to the teacher's ``image_size`` (its published evaluation size;
    None keeps them as they are) with its ``resize`` filter before the model sees them.

    ``forward`` gives the descriptor (mining with ``mine_with='teacher'``), ``targets`` the
    distillation targets. The model's parameters sit under ``model``.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int] | None = None, resize: str = "bilinear") -> None:
        super().__init__()
        if not hasattr(model, "distill_targets"):
            raise ValueError(
                f"{type(model).__name__} defines no distillation targets (distill_targets): "
                "not a wakd.zoo model"
            )
        self.model = model
        self.image_size = tuple(image_size) if image_size else None
        # PIL's filters by their torch names; 'none' (full resolution) never resizes anyway.
        self.mode = "bicubic" if resize == "bicubic" else "bilinear"
        self.description = getattr(model, "zoo_description", type(model).__name__)

    def resize(self, images: Tensor) -> Tensor:
        if self.image_size is None or tuple(images.shape[-2:]) == self.image_size:
            return images
        resized = F.interpolate(images, size=self.image_size, mode=self.mode, align_corners=False, antialias=True)
        return resized.clamp(0, 1)  # bicubic overshoots

    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.resize(images))

    def targets(self, images: Tensor) -> DistillTargets:
        return self.model.distill_targets(self.resize(images))
