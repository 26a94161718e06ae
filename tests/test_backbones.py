"""Backbones: cut points, channels/stride, trainable layers, weight loading."""

import time

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from wakd.models import build_backbone
from wakd.models.normalization import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("name", "cut", "proj_dim", "trunk_channels", "channels", "stride"),
    [
        ("vgg16", None, None, 512, 512, 16),
        ("mobilenetv3_large", None, None, 960, 512, 32),
        ("mobilenetv3_large", "full", 256, 960, 256, 32),
        ("mobilenetv3_large", "stride16", None, 112, 512, 16),
        ("resnet18", None, None, 256, 256, 16),
        ("resnet18", "layer4", 128, 512, 128, 32),
        ("resnet50", None, None, 1024, 1024, 16),
        ("resnet50", "layer4", None, 2048, 2048, 32),
    ],
)
def test_channels_and_stride(name, cut, proj_dim, trunk_channels, channels, stride):
    backbone = build_backbone(name, cut=cut, proj_dim=proj_dim).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, channels, 64 // stride, 96 // stride)
    assert (backbone.out_channels, backbone.stride) == (channels, stride)
    if hasattr(backbone, "proj"):
        assert backbone.proj[0].in_channels == trunk_channels
    else:
        assert channels == trunk_channels


def test_vgg16_ends_at_conv5_3_before_relu():
    backbone = build_backbone("vgg16").eval()
    assert isinstance(backbone.features[-1], torch.nn.Conv2d)
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 32, 32))
    assert (out < 0).any()  # no ReLU after conv5_3


def test_mobilenet_stride16_gives_6x8_at_demo_size():
    backbone = build_backbone("mobilenetv3_large", cut="stride16").eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 96, 128)).shape[-2:] == (6, 8)


def _trainable(module):
    return {p.requires_grad for p in module.parameters()}


def test_vgg16_default_trains_conv5_only_on_pretrained_weights(tmp_path):
    assert _trainable(build_backbone("vgg16")) == {True}  # a random start trains every layer
    torch.save(build_backbone("vgg16").state_dict(), tmp_path / "vgg16.pth")
    backbone = build_backbone("vgg16", weights=tmp_path / "vgg16.pth")
    assert _trainable(backbone.features[:24]) == {False}
    assert _trainable(backbone.features[24:]) == {True}
    assert len(list(backbone.features[24:].parameters())) == 6  # conv5_1..3 weight + bias
    assert _trainable(build_backbone("vgg16", trainable="all")) == {True}
    assert _trainable(build_backbone("resnet18", trainable="none")) == {False}
    assert _trainable(build_backbone("mobilenetv3_large")) == {True}


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'"):
        build_backbone("vgg19")
    with pytest.raises(ValueError, match="unknown cut 'layer2'"):
        build_backbone("resnet18", cut="layer2")
    with pytest.raises(ValueError, match="trainable='some'"):
        build_backbone("resnet18", trainable="some")


def test_imagenet_without_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        build_backbone("vgg16", weights="imagenet")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "model.weights=" in message


def test_imagenet_from_cache_ignores_layers_past_the_cut(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = tvm.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = build_backbone("resnet18", weights="imagenet")  # cut at layer3: no layer4, fc
    assert torch.equal(backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, source.bn1.running_var)


def test_torchvision_pth_loads_and_projection_stays_new(tmp_path):
    source = tvm.mobilenet_v3_large()
    torch.save(source.state_dict(), tmp_path / "mbv3.pth")
    backbone = build_backbone("mobilenetv3_large", weights=tmp_path / "mbv3.pth", cut="stride16")
    loaded = backbone.state_dict()
    trunk = [k for k in loaded if not k.startswith(("proj.", "normalize."))]
    assert trunk and all(torch.equal(loaded[k], source.state_dict()[k]) for k in trunk)
    assert "proj.0.weight" in loaded  # present, initialised rather than loaded
    # torchvision files carry no normalisation: the ImageNet one their weights were trained with
    assert torch.equal(backbone.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(backbone.normalize.std.flatten(), torch.tensor(IMAGENET_STD))


def test_safetensors_round_trip(tmp_path):
    source = build_backbone("resnet18", proj_dim=64)
    with torch.no_grad():
        source.proj[1].running_mean.normal_()
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    loaded = build_backbone("resnet18", weights=tmp_path / "backbone.safetensors", proj_dim=64)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_lightning_checkpoint_takes_net_backbone(tmp_path):
    source = build_backbone("resnet18")
    state = {f"net.backbone.{k}": v for k, v in source.state_dict().items()}
    state["net.pool.centroids"] = torch.zeros(4, 256)
    state["teacher.backbone.features.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state, "epoch": 2}, tmp_path / "last.ckpt")
    loaded = build_backbone("resnet18", weights=tmp_path / "last.ckpt")
    assert torch.equal(loaded.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_wrong_architecture_lists_shape_mismatches(tmp_path):
    torch.save(tvm.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"r50\.pth.*do not fit") as err:
        build_backbone("resnet18", weights=tmp_path / "r50.pth")
    assert "layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in str(err.value)
