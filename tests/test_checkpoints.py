"""Loading PlaceNet weights: wakd, OpenIBL/WAKD and plain layouts, their input normalisation;
mismatches; unsafe pickles."""

import pytest
import torch
from torchvision import transforms as T

from wakd.models import build_place_net, load_place_net_weights
from wakd.models.normalization import IMAGENET_MEAN, IMAGENET_STD, OPENIBL_MEAN, OPENIBL_STD

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(net):
    """Every weight random (so a load that misses one shows); the input normalisation kept."""
    with torch.no_grad():
        for key, tensor in net.state_dict().items():
            if tensor.is_floating_point() and "normalize." not in key:
                tensor.normal_()
    return net


def _assert_same(net, source):
    for key, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_plain_state_dict(tmp_path):
    source = _randomised(build_place_net("resnet18", num_clusters=4))
    torch.save(source.state_dict(), tmp_path / "net.pth")
    net = build_place_net("resnet18", num_clusters=4)
    load_place_net_weights(net, tmp_path / "net.pth")
    _assert_same(net, source)


def test_lightning_checkpoint_ignores_other_prefixes(tmp_path):
    source = _randomised(build_place_net("mobilenetv3_large", cut="stride16", num_clusters=4))
    state = {f"net.{k}": v for k, v in source.state_dict().items()}
    state["teacher.pool.centroids"] = torch.zeros(64, 512)
    state["prev_net.pool.centroids"] = torch.zeros(3, 3)
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, tmp_path / "last.ckpt")
    net = build_place_net("mobilenetv3_large", cut="stride16", num_clusters=4)
    load_place_net_weights(net, tmp_path / "last.ckpt")
    _assert_same(net, source)


def _openibl_vgg16_file(path, source):
    """``source``'s weights in OpenIBL's layout (which stores no input normalisation)."""
    state = {f"module.base_model.base.{k}": v for k, v in source.backbone.features.state_dict().items()}
    state["module.net_vlad.conv.weight"] = source.pool.conv.weight
    state["module.net_vlad.centroids"] = source.pool.centroids
    torch.save({"state_dict": state, "epoch": 4, "best_recall5": 0.9}, path)
    return path


def test_openibl_vgg16_checkpoint(tmp_path):
    source = _randomised(build_place_net("vgg16", num_clusters=4))
    net = build_place_net("vgg16", num_clusters=4)
    load_place_net_weights(net, _openibl_vgg16_file(tmp_path / "openibl.pth", source))
    for key, value in source.state_dict().items():
        if not key.startswith("backbone.normalize."):
            assert torch.equal(net.state_dict()[key], value), key
    assert net.backbone.features[28].weight.shape == (512, 512, 3, 3)  # conv5_3
    # The reference's input: ToTensor pixels through Normalize(OPENIBL_MEAN, [1/255] * 3).
    assert torch.equal(net.backbone.normalize.mean.flatten(), torch.tensor(OPENIBL_MEAN))
    assert torch.equal(net.backbone.normalize.std.flatten(), torch.tensor(OPENIBL_STD))
    pixels = torch.rand(2, 3, 32, 48)
    expected = T.Normalize(OPENIBL_MEAN, OPENIBL_STD)(pixels)  # OpenIBL's own transform
    assert torch.equal(net.backbone.normalize(pixels), expected)
    torch.testing.assert_close(net.backbone.normalize(pixels), pixels * 255 - torch.tensor(OPENIBL_MEAN).view(3, 1, 1) * 255)
    # As the start of a model (model.weights=FILE) it brings the same normalisation.
    start = build_place_net("vgg16", weights=tmp_path / "openibl.pth", num_clusters=4)
    assert torch.equal(start.backbone.normalize.mean, net.backbone.normalize.mean)
    assert torch.equal(start.backbone.normalize.std, net.backbone.normalize.std)


def test_wakd_checkpoint_carries_its_input_normalisation(tmp_path):
    torch.manual_seed(0)
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]}
    source = build_place_net("resnet18", num_clusters=4, input_norm=norm).eval()
    assert source.backbone.normalize.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    state = {f"net.{k}": v for k, v in source.state_dict().items()}
    assert "net.backbone.normalize.mean" in state and "net.backbone.normalize.std" in state
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    torch.manual_seed(1)
    net = build_place_net("resnet18", num_clusters=4).eval()  # other weights, ImageNet's normalisation
    imagenet = build_place_net("resnet18", num_clusters=4).eval()
    imagenet.load_state_dict({k: v for k, v in source.state_dict().items() if "normalize" not in k}, strict=False)
    load_place_net_weights(net, tmp_path / "last.ckpt")
    _assert_same(net, source)
    images = torch.rand(2, 3, 64, 86)
    with torch.no_grad():
        assert torch.equal(net(images), source(images))
        assert not torch.allclose(imagenet(images), source(images), atol=1e-3)  # the normalisation matters
    # model.weights=<wakd checkpoint>: the backbone comes with its normalisation too
    start = build_place_net("resnet18", weights=tmp_path / "last.ckpt", num_clusters=4)
    assert torch.equal(start.backbone.normalize.std, source.backbone.normalize.std)


def test_old_wakd_checkpoint_without_normalisation_keeps_imagenet(tmp_path):
    """Checkpoints written before the normalisation was stored were all trained on ImageNet's."""
    source = _randomised(build_place_net("resnet18", num_clusters=4))
    state = {f"net.{k}": v for k, v in source.state_dict().items() if "normalize" not in k}
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    net = build_place_net("resnet18", num_clusters=4)
    load_place_net_weights(net, tmp_path / "old.ckpt")
    assert net.backbone.normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert net.backbone.normalize.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    for key, value in state.items():
        assert torch.equal(net.state_dict()[key.removeprefix("net.")], value), key


def test_unknown_input_norm_is_refused():
    with pytest.raises(ValueError, match="input_norm='caffe'"):
        build_place_net("resnet18", num_clusters=4, input_norm="caffe")
    with pytest.raises(ValueError, match="3 means and 3 positive stds"):
        build_place_net("resnet18", num_clusters=4, input_norm={"mean": [0.5], "std": [0.5]})


def test_wrong_size_lists_both_shapes(tmp_path):
    torch.save(build_place_net("resnet18", num_clusters=8).state_dict(), tmp_path / "k8.pth")
    with pytest.raises(ValueError, match="do not fit this PlaceNet") as err:
        load_place_net_weights(build_place_net("resnet18", num_clusters=4), tmp_path / "k8.pth")
    message = str(err.value)
    assert "pool.centroids: file (8, 256) vs model (4, 256)" in message
    assert "pool.conv.weight: file (8, 256, 1, 1) vs model (4, 256, 1, 1)" in message


def test_wrong_architecture_lists_missing_and_unexpected(tmp_path):
    torch.save(build_place_net("resnet18", num_clusters=4).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as err:
        load_place_net_weights(build_place_net("vgg16", num_clusters=4), tmp_path / "r18.pth")
    message = str(err.value)
    assert "missing in file" in message and "backbone.features.0.weight" in message
    assert "unexpected in file" in message and "backbone.layer1.0.conv1.weight" in message


class _Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "marker"
    torch.save({"state_dict": {"x": _Malicious(control)}}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)  # the payload does run when allowed
    assert control.exists()

    torch.save({"state_dict": {"x": _Malicious(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: refusing to load"):
        load_place_net_weights(build_place_net("resnet18", num_clusters=2), tmp_path / "evil.pth")
    assert not marker.exists()
