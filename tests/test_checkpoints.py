"""Loading PlaceNet weights: wakd, OpenIBL/WAKD and plain layouts; mismatches; unsafe pickles."""

import pytest
import torch

from wakd.models import build_place_net, load_place_net_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(net):
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
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


def test_openibl_vgg16_checkpoint(tmp_path):
    source = _randomised(build_place_net("vgg16", num_clusters=4))
    state = {
        f"module.base_model.base.{k.removeprefix('features.')}": v
        for k, v in source.backbone.state_dict().items()
    }
    state["module.net_vlad.conv.weight"] = source.pool.conv.weight
    state["module.net_vlad.centroids"] = source.pool.centroids
    torch.save({"state_dict": state, "epoch": 4, "best_recall5": 0.9}, tmp_path / "openibl.pth")
    net = build_place_net("vgg16", num_clusters=4)
    load_place_net_weights(net, tmp_path / "openibl.pth")
    _assert_same(net, source)
    assert net.backbone.features[28].weight.shape == (512, 512, 3, 3)  # conv5_3


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
