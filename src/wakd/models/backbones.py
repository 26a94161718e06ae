"""CNN backbones cut where place recognition wants them, with their weights.

A ``Backbone`` is an ``nn.Sequential`` whose children keep torchvision's names
(``features``, ``conv1``, ``layer3`` ...), so torchvision/timm ImageNet state
dicts load by key; an optional new 1x1 projection is appended as ``proj``.
Its first child, ``normalize`` (``wakd.models.normalization``), takes 0-1 pixels
to the scale its weights were trained on: held here rather than in ``PlaceNet``
because pretraining, clustering and ``model.weights`` use the backbone alone, and
its state dict must carry the normalisation to wherever the weights go. It is
``input_norm`` unless the weights file carries its own (a wakd checkpoint's
``normalize.*`` buffers, OpenIBL's MatConvNet scale for OpenIBL/WAKD files):
torchvision/timm ImageNet files and wakd files older than the buffers keep
``input_norm`` (default ``'imagenet'``, what those were trained with).

Names and cut points (total stride in brackets):

* ``vgg16``: ``features[:29]``, conv5_3 *before* its ReLU, 512 ch (16) as in
  NetVLAD/OpenIBL; ``trainable='default'`` trains conv5 only when the weights are
  pretrained, every layer from a random start.
* ``mobilenetv3_large``: ``cut='full'`` (default, the paper) all features,
  960 ch (32); ``cut='stride16'`` stops after the last stride-16 block,
  112 ch (16). Always followed by a 1x1 conv -> ``proj_dim`` (default 512) +
  BatchNorm + Hardswish, so its local features are as wide as the teacher's.
* ``resnet18`` / ``resnet50``: ``cut='layer3'`` (default: stride 16 kept small
  demo images usable, see docs/design.md) 256 / 1024 ch, or ``'layer4'``
  512 / 2048 ch (32). Optional projection.

``trainable``: ``'default'`` (above), ``'all'`` or ``'none'``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torchvision.models as tvm
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from wakd.models.checkpoints import StateDict, load_checked, place_net_state, read_state_dict
from wakd.models.normalization import InputNorm, input_normalization
from wakd.pretrained import check_weights_available, imagenet_cache_file

# A builder's result: named torchvision layers, their output channels, total stride.
Layers = tuple[OrderedDict[str, nn.Module], int, int]

# Index of conv5_1 in torchvision's VGG16 ``features`` (OpenIBL's 'conv5' split).
_VGG16_CONV5 = 24
# MobileNetV3-Large ``features[13]`` is the first stride-32 block.
_MOBILENET_STRIDE16_END = 13


class Backbone(nn.Sequential):
    """0-1 pixels [B, 3, H, W] -> local features [B, out_channels, H / stride, W / stride]."""

    def __init__(
        self,
        name: str,
        layers: OrderedDict[str, nn.Module],
        out_channels: int,
        stride: int,
        proj_dim: int | None = None,
        input_norm: InputNorm = "imagenet",
    ) -> None:
        layers = OrderedDict([("normalize", input_normalization(input_norm)), *layers.items()])
        if proj_dim is not None:
            layers["proj"] = nn.Sequential(
                nn.Conv2d(out_channels, proj_dim, 1, bias=False),
                nn.BatchNorm2d(proj_dim),
                nn.Hardswish(),
            )
            out_channels = proj_dim
        super().__init__(layers)
        self.name = name
        self.out_channels = out_channels
        self.stride = stride


def _vgg16_features() -> nn.Sequential:
    # make_layers skips the 100M-parameter classifier that vgg16() would initialise.
    features = make_layers(cfgs["D"])
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # torchvision VGG's own initialisation
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _vgg16(cut: str | None) -> Layers:
    _check_cut("vgg16", cut, ("conv5_3",))
    return OrderedDict(features=_vgg16_features()[:29]), 512, 16


def _mobilenetv3_large(cut: str | None) -> Layers:
    _check_cut("mobilenetv3_large", cut, ("full", "stride16"))
    features = tvm.mobilenet_v3_large().features
    if cut == "stride16":
        return OrderedDict(features=features[:_MOBILENET_STRIDE16_END]), 112, 16
    return OrderedDict(features=features), 960, 32


def _resnet(factory: Callable[[], tvm.ResNet], name: str) -> Callable[[str | None], Layers]:
    def build(cut: str | None) -> Layers:
        _check_cut(name, cut, ("layer3", "layer4"))
        net = factory()
        last = cut or "layer3"
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
        names += ["layer4"] if last == "layer4" else []
        # The last block's output width: BasicBlock.conv2 / Bottleneck.conv3.
        block = getattr(net, last)[-1]
        channels = (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
        return (
            OrderedDict((n, getattr(net, n)) for n in names),
            channels,
            16 if last == "layer3" else 32,
        )

    return build


BACKBONES: dict[str, Callable[[str | None], Layers]] = {
    "vgg16": _vgg16,
    "mobilenetv3_large": _mobilenetv3_large,
    "resnet18": _resnet(tvm.resnet18, "resnet18"),
    "resnet50": _resnet(tvm.resnet50, "resnet50"),
}

def _check_cut(name: str, cut: str | None, valid: tuple[str, ...]) -> None:
    if cut is not None and cut not in valid:
        raise ValueError(f"backbone {name!r}: unknown cut {cut!r}; choose one of {valid} or None")


def _imagenet_state(name: str) -> tuple[StateDict, Path]:
    check_weights_available(name, "imagenet")
    path = imagenet_cache_file(name)
    return read_state_dict(path), path


def _load_weights(backbone: Backbone, weights: str) -> None:
    if weights == "imagenet":
        state, source = _imagenet_state(backbone.name)
    else:
        source = Path(weights)
        state = read_state_dict(source)
    state = place_net_state(state)
    if any(k.startswith("backbone.") for k in state):
        # A whole place network (wakd Lightning, OpenIBL/WAKD or PlaceNet): exact match.
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        load_checked(backbone, state, source)
    elif any(k.startswith("proj.") for k in state):
        load_checked(backbone, state, source)  # a saved Backbone.state_dict()
    else:
        # ImageNet classifier weights: layers past the cut are unused, the
        # projection is new and keeps its initialisation.
        load_checked(
            backbone,
            state,
            source,
            may_miss=lambda key: key.startswith("proj."),
            ignore_unexpected=True,
        )


def _set_trainable(backbone: Backbone, trainable: str, pretrained: bool) -> None:
    if trainable not in ("default", "all", "none"):
        raise ValueError(f"trainable={trainable!r}: choose 'default', 'all' or 'none'")
    backbone.requires_grad_(trainable != "none")
    if trainable == "default" and backbone.name == "vgg16" and pretrained:
        # NetVLAD/OpenIBL train conv5 only, keeping conv1-conv4's pretrained filters; a
        # random start trains every layer (as the reference does without pretrained weights).
        backbone.features[:_VGG16_CONV5].requires_grad_(False)


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    cut: str | None = None,
    trainable: str = "default",
    proj_dim: int | None = None,
    bn_momentum: float | None = None,
    input_norm: InputNorm = "imagenet",
) -> Backbone:
    """Backbone ``name`` cut at ``cut``; ``weights``: None (random), 'imagenet' or a file path.

    ``bn_momentum``: BatchNorm's running-statistics momentum for every layer (None keeps
    the architecture's: torchvision's MobileNetV3 uses 0.01, tuned for long ImageNet runs).
    ``input_norm``: 'imagenet', 'openibl' or {mean, std}, unless ``weights`` carries its
    own (module docstring).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    if name == "mobilenetv3_large" and proj_dim is None:
        proj_dim = 512
    layers, channels, stride = BACKBONES[name](cut)
    backbone = Backbone(name, layers, channels, stride, proj_dim, input_norm)
    if weights is not None:
        _load_weights(backbone, str(weights))
    _set_trainable(backbone, trainable, pretrained=weights is not None)
    if bn_momentum is not None:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return backbone
