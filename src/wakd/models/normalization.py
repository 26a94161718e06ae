"""Input normalisation, part of the model: images enter every wakd network as 0-1 pixels.

Weights are only meaningful on pixels scaled as during their training, so the scaling
travels with them: a ``Backbone`` starts with an ``InputNormalization`` whose buffers
``normalize.mean`` / ``normalize.std`` are saved in every checkpoint. Data pipelines
deliver float32 RGB in [0, 1] (``ToTensor``'s scale) and never normalise.

The two normalisations in use (the only definitions in the project):

* ``imagenet``: torchvision's ImageNet statistics, what its (and timm's) ImageNet
  weights expect, and what every wakd checkpoint written before the normalisation
  was stored in it was trained with;
* ``openibl``: OpenIBL's / WAKD's transform ``Normalize(mean=OPENIBL_MEAN,
  std=[1/255] * 3)`` on ``ToTensor`` pixels, i.e. MatConvNet's VGG16 input: 0-255
  pixels minus the mean image colour in 0-255 units, not scaled. OpenIBL/WAKD
  checkpoints were trained on it (``wakd.models.checkpoints`` gives them this one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# yxgeee/OpenIBL ibl/utils/data/__init__.py, get_transformer_train / get_transformer_test (6d5ecca).
OPENIBL_MEAN = (0.48501960784313836, 0.4579568627450961, 0.4076039215686255)
OPENIBL_STD = (0.00392156862745098, 0.00392156862745098, 0.00392156862745098)

INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "openibl": (OPENIBL_MEAN, OPENIBL_STD),
}

# A normalisation by name, or explicitly as {"mean": [r, g, b], "std": [r, g, b]} on 0-1 pixels.
InputNorm = str | Mapping[str, Sequence[float]]


class InputNormalization(nn.Module):
    """0-1 pixels [B, 3, H, W] -> ``(x - mean) / std`` per channel, as torchvision's
    ``Normalize`` computes it (so bit-identical to a ``ToTensor`` + ``Normalize``
    pipeline). ``mean`` / ``std`` are persistent buffers [1, 3, 1, 1]: checkpoints
    carry them, and exports (ONNX, TorchScript) bake them in."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.shape != (3,) or std_t.shape != (3,) or not bool((std_t > 0).all()):
            raise ValueError(f"input normalisation needs 3 means and 3 positive stds, got {list(mean)}, {list(std)}")
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1))
        self.register_buffer("std", std_t.view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def input_normalization(spec: InputNorm) -> InputNormalization:
    """``InputNormalization`` of ``spec``: 'imagenet', 'openibl' or {mean, std} (0-1 pixel units)."""
    if isinstance(spec, str):
        if spec in INPUT_NORMS:
            return InputNormalization(*INPUT_NORMS[spec])
    elif isinstance(spec, Mapping) and set(spec) == {"mean", "std"}:
        return InputNormalization(spec["mean"], spec["std"])
    raise ValueError(f"input_norm={spec!r}: choose one of {sorted(INPUT_NORMS)} or {{mean: [...], std: [...]}}")


def input_norm_state(name: str) -> dict[str, Tensor]:
    """The buffers (``mean``, ``std``) of the named normalisation, to put into a state dict."""
    return input_normalization(name).state_dict()
