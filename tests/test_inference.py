"""optimize_for_inference: same descriptors as eager fp32, for any descriptor network."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import ConcatDataset

from wakd.data.images import ImageListDataset, TensorImageDataset, build_transform, cpu_workers
from wakd.describe import extract_descriptors
from wakd.models import PlaceNet, build_place_net
from wakd.models.inference import (
    ChannelsLast,
    OnnxDescriptorNet,
    export_onnx,
    fold_batchnorm,
    optimize_for_inference,
)
from wakd.synth.rawpixels import RawPixels

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


def test_onnxruntime_splits_the_batch_over_threads() -> None:
    """Each thread describes its part of the batch: the same descriptors as one run."""
    net = small_nets()["mobilenetv3"].eval()
    buffer = io.BytesIO()
    export_onnx(fold_batchnorm(net), torch.randn(1, 3, *IMAGE_SIZE), buffer)
    single, split = OnnxDescriptorNet(buffer.getvalue(), threads=1), OnnxDescriptorNet(buffer.getvalue(), threads=3)
    images = torch.randn(7, 3, *IMAGE_SIZE)
    for batch in (images, images[:2], images[:1]):  # 3 + 2 + 2, two of one, one
        assert torch.equal(split(batch), single(batch))
    assert split._pool is not None and single._pool is None
    with torch.no_grad():
        assert max_error(split(images), net(images)) < 1e-4
    # Runs of one image each (a 480x640 image's pixels per run by default) change nothing.
    one_by_one = OnnxDescriptorNet(buffer.getvalue(), threads=1, run_pixels=IMAGE_SIZE[0] * IMAGE_SIZE[1])
    whole = OnnxDescriptorNet(buffer.getvalue(), threads=1, run_pixels=10**9)
    assert max_error(one_by_one(images), whole(images)) < 1e-6


def test_extraction_on_the_optimised_path() -> None:
    net = small_nets()["mobilenetv3"].eval()
    images = torch.randn(7, 3, *IMAGE_SIZE)
    fast = optimize_for_inference(net, images[:2])
    result = extract_descriptors(fast, TensorImageDataset(images), batch_size=3, num_workers=0, progress=False)
    with torch.no_grad():
        expected = net(images)
    assert result.descriptors.shape == (7, net.descriptor_dim) and result.valid.all()
    # Descriptors are stored as fp16: compare at fp16 precision.
    assert max_error(torch.from_numpy(result.descriptors).float(), expected) < 2e-3


def _image_files(tmp_path: Path, count: int) -> list[Path]:
    """Noise JPEGs larger than IMAGE_SIZE (resized on loading), then one truncated file."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(tmp_path / f"{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes((tmp_path / "0.jpg").read_bytes()[:300])
    return [*paths, tmp_path / "bad.jpg"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_extraction_of_image_files_equals_the_float_path(
    tmp_path: Path, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers decode to uint8 and extraction converts the batch to float: the very same network
    inputs as the datasets' own float images (corrupt ones included), so equal descriptors."""
    monkeypatch.setattr("wakd.data.images.cpu_workers", lambda n: n)  # a worker on any machine
    net = small_nets()["mobilenetv3"].eval()
    paths = _image_files(tmp_path, 6)
    tf = build_transform(IMAGE_SIZE, train=False)
    dataset = ConcatDataset(
        [ImageListDataset(paths[:2], tf, skip_corrupt=True), ImageListDataset(paths[2:], tf, skip_corrupt=True)]
    )
    items = [dataset[i] for i in range(len(dataset))]
    assert [valid for _, _, valid in items] == [True] * 6 + [False]
    images = torch.stack([image for image, _, _ in items])
    with torch.no_grad():  # the batches extraction makes (batch size 3)
        expected = torch.cat([net(images[i : i + 3]) for i in range(0, len(images), 3)])
    eager = extract_descriptors(
        net, dataset, batch_size=3, num_workers=num_workers, progress=False, optimize=False
    )
    assert torch.equal(torch.from_numpy(eager.descriptors), expected.half())
    assert eager.valid.tolist() == [True] * 6 + [False]
    fast = extract_descriptors(net, dataset, batch_size=3, num_workers=num_workers, progress=False)
    assert max_error(torch.from_numpy(fast.descriptors).float(), expected) < 2e-3  # fp16 storage


def test_cpu_extraction_leaves_the_forward_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert [cpu_workers(n) for n in (0, 1, 2, 4)] == [0, 0, 0, 0]  # decode inline
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert [cpu_workers(n) for n in (0, 1, 2)] == [0, 1, 1]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [cpu_workers(n) for n in (0, 2, 8, 12)] == [0, 2, 8, 8]


@pytest.mark.parametrize("optimize", [False, True])
def test_extraction_gives_every_submodule_its_mode_back(optimize: bool) -> None:
    """A training net with frozen BatchNorm (module.freeze_batchnorm) comes back from
    extraction (mining, validation) exactly so: net.train(True) would wake the BatchNorm."""
    net = small_nets()["mobilenetv3"].train()
    frozen = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in frozen:
        module.eval()
    before = {name: m.training for name, m in net.named_modules()}
    extract_descriptors(net, TensorImageDataset(torch.randn(4, 3, *IMAGE_SIZE)), batch_size=2, num_workers=0,
                        progress=False, optimize=optimize)
    assert {name: m.training for name, m in net.named_modules()} == before
    assert net.training and not any(m.training for m in frozen)
