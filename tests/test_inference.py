"""optimize_for_inference: same descriptors as eager fp32, for any descriptor network."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from wakd.eval.extract import extract_descriptors
from wakd.models import PlaceNet, build_place_net
from wakd.models.inference import (
    ChannelsLast,
    OnnxDescriptorNet,
    fold_batchnorm,
    optimize_for_inference,
)
from wakd.models.rawpixels import RawPixels

IMAGE_SIZE = (64, 86)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_batchnorm(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics: a fresh BatchNorm is the identity, folding it tests nothing."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in (
                    (m.running_mean, -0.5, 0.5),
                    (m.running_var, 0.5, 2.0),
                    (m.weight, 0.5, 1.5),
                    (m.bias, -0.5, 0.5),
                ):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return net


def small_nets() -> dict[str, PlaceNet]:
    torch.manual_seed(0)
    return {
        "resnet18": randomise_batchnorm(build_place_net("resnet18", cut="layer3", num_clusters=8)),
        "mobilenetv3": randomise_batchnorm(
            build_place_net("mobilenetv3_large", cut="stride16", proj_dim=64, num_clusters=8)
        ),
    }


def max_error(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "auto"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3"])
def test_same_descriptors_as_eager(name: str, backend: str) -> None:
    net = small_nets()[name].train()
    fast = optimize_for_inference(net, torch.randn(2, 3, *IMAGE_SIZE), backend=backend)
    expected_type = ChannelsLast if backend == "torch" else OnnxDescriptorNet
    assert isinstance(fast, expected_type)
    assert fast.descriptor_dim == net.descriptor_dim
    # The original is untouched: still training, still trainable.
    assert net.training and all(p.requires_grad for p in net.pool.parameters())
    images = torch.randn(5, 3, 96, 128)  # another batch and image size than the example
    with torch.no_grad():
        assert max_error(fast(images), net.eval()(images)) < 1e-4


def test_batchnorm_is_folded_everywhere() -> None:
    net = small_nets()["resnet18"]  # ResNet blocks call their BatchNorms outside any Sequential
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    images = torch.randn(2, 3, *IMAGE_SIZE)
    with torch.no_grad():
        assert max_error(folded(images), net.eval()(images)) < 1e-4


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: Tensor) -> Tensor:
        x = self.bn(self.conv(images))
        if x.mean() > 0:
            x = -x
        return nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)


def test_untraceable_network_is_kept_unfolded(caplog: pytest.LogCaptureFixture) -> None:
    net = randomise_batchnorm(DataDependent())
    images = torch.randn(3, 3, *IMAGE_SIZE)
    fast = optimize_for_inference(net, images, backend="torch")
    assert "kept unfolded" in caplog.text
    with torch.no_grad():
        assert max_error(fast(images), net.eval()(images)) < 1e-4


def test_parameter_free_network_stays_in_pytorch() -> None:
    net = RawPixels()
    images = torch.randn(3, 3, *IMAGE_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed ONNX export attempt, no fallback
        fast = optimize_for_inference(net, images)
    assert isinstance(fast, ChannelsLast) and fast.descriptor_dim == net.descriptor_dim
    assert max_error(fast(images), net(images)) == 0


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool]:
        return self.images[i], i, True


def test_extraction_on_the_optimised_path() -> None:
    net = small_nets()["mobilenetv3"].eval()
    images = torch.randn(7, 3, *IMAGE_SIZE)
    fast = optimize_for_inference(net, images[:2])
    result = extract_descriptors(fast, _Images(images), batch_size=3, num_workers=0, progress=False)
    with torch.no_grad():
        expected = net(images)
    assert result.descriptors.shape == (7, net.descriptor_dim) and result.valid.all()
    # Descriptors are stored as fp16: compare at fp16 precision.
    assert max_error(torch.from_numpy(result.descriptors).float(), expected) < 2e-3
