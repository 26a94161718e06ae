"""The paper's path by default: ImageNet starts that fail fast when absent, freezing of
pretrained layers only, the hard-loss positive, the reference's Gram rows, and students
that start from a trained place network (NetVLAD included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose_cfg

from wakd.data.datamodule import TupleDataset
from wakd.data.datasets import load_split
from wakd.data.images import build_transform
from wakd.data.tuple_miner import MinedTuple, TupleMiner
from wakd.jobs import train
from wakd.losses import distill_loss, hard_loss, teacher_targets
from wakd.models import build_place_net
from wakd.modules.place_module import PlaceModule, reference_gram_rows
from wakd.pretrained import IMAGENET_URLS, imagenet_cache_file, torch_hub_dir


def test_paper_configs_default_to_imagenet_weights(tmp_path: Path) -> None:
    for model in ("vgg16", "mobilenetv3_large", "resnet18", "resnet50"):
        cfg = compose_cfg("train", [f"model={model}", f"teacher={model}"], tmp_path, tmp_path / "run")
        assert cfg.model.weights == "imagenet" and cfg.teacher.weights == "imagenet"


def test_imagenet_file_table_is_torchvisions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.models as tvm

    torchvision_urls = {
        "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1.url,
        "mobilenetv3_large": tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2.url,
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1.url,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2.url,
    }
    assert torchvision_urls == IMAGENET_URLS
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert torch_hub_dir() == Path(torch.hub.get_dir())


def test_missing_imagenet_cache_fails_before_reading_data(tmp_path: Path) -> None:
    """No torch hub cache and no dataset: the weights error comes first and names the file."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "model=vgg16", "teacher=none",
         f"paths.data_dir={tmp_path / 'no-data'}", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    expected = imagenet_cache_file("vgg16").name  # vgg16-397923af.pth
    assert expected in result.stderr and "model.weights=null" in result.stderr
    assert str(tmp_path / "empty-cache") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "no-data").exists()


def test_vgg16_freezes_conv1_to_conv4_only_when_pretrained(tmp_path: Path) -> None:
    random_start = build_place_net("vgg16", num_clusters=4)
    assert all(p.requires_grad for p in random_start.parameters())
    weights = tmp_path / "vgg16.pth"
    torch.save(random_start.backbone.state_dict(), weights)
    pretrained = build_place_net("vgg16", weights=weights, num_clusters=4)
    frozen = {n for n, p in pretrained.backbone.named_parameters() if not p.requires_grad}
    conv1_to_conv4 = {f"features.{i}.{w}" for i in range(24) if i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
                      for w in ("weight", "bias")}
    assert frozen == conv1_to_conv4


def test_a_trained_place_network_starts_with_its_netvlad(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_place_net("resnet18", num_clusters=8)
    torch.nn.init.normal_(trained.pool.centroids)
    ckpt = tmp_path / "baseline.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    start = build_place_net("resnet18", weights=ckpt, num_clusters=8)
    assert start.pool_from_weights
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(start.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # A backbone-only file (ImageNet, pretraining) leaves NetVLAD to k-means.
    backbone_only = tmp_path / "backbone.pth"
    torch.save(trained.backbone.state_dict(), backbone_only)
    assert not build_place_net("resnet18", weights=backbone_only, num_clusters=8).pool_from_weights


def test_training_from_a_trained_baseline_keeps_its_netvlad_and_skips_clustering(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    first = compose_cfg("train", [*TINY_TRAIN, "teacher=none", f"paths.cluster_dir={tmp_path / 'c1'}"],
                        tiny_data_dir, tmp_path / "baseline")
    train.run(first)
    baseline = tmp_path / "baseline" / "checkpoints" / "last.ckpt"
    # lr 0: the run's checkpoint then shows the weights it started from.
    overrides = [*TINY_TRAIN, "teacher=none", f"model.weights={baseline}", "optimizer.lr=0",
                 "trainer.limit_train_batches=1", f"paths.cluster_dir={tmp_path / 'c2'}"]
    train.run(compose_cfg("train", overrides, tiny_data_dir, tmp_path / "student"))
    assert not (tmp_path / "c2").exists()  # no k-means: NetVLAD came with the weights
    before = torch.load(baseline, weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in ("net.pool.centroids", "net.pool.conv.weight"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def _one_query_miner(tiny_data_dir: Path) -> TupleMiner:
    split = load_split("synthcity", tiny_data_dir / "synthcity" / "raw", "train")
    return TupleMiner(split, pos_num=2, neg_num=2, pos_pool=5, neg_pool=30)


def test_hard_positive_is_the_nearest_by_original_distance_even_when_reranked(tiny_data_dir: Path) -> None:
    miner = _one_query_miner(tiny_data_dir)
    split = miner.split
    rng = np.random.default_rng(0)
    q_desc = rng.normal(size=(split.num_queries, 16)).astype(np.float16)
    db_desc = rng.normal(size=(split.num_db, 16)).astype(np.float16)
    queries = miner.queries[:20]
    for rerank in (False, True):
        for t in miner.mine(queries, q_desc, db_desc, np.random.default_rng(1), rerank=rerank):
            candidates = miner.positives[t.query]
            dist = ((db_desc[candidates].astype(np.float32) - q_desc[t.query].astype(np.float32)) ** 2).sum(1)
            assert t.hard_positive == candidates[np.argmin(dist)]
            if not rerank:
                assert t.positives[0] == t.hard_positive  # nearest first in both lists


def test_tuple_images_follow_the_reference_order(tiny_data_dir: Path) -> None:
    split = load_split("synthcity", tiny_data_dir / "synthcity" / "raw", "train")
    t = MinedTuple(query=3, hard_positive=7, negatives=np.array([11, 12, 13]), positives=np.array([7, 8, 9]))
    _, ids = TupleDataset(split, [t], build_transform((8, 8), train=False), skip_corrupt=False)[0]
    q = split.num_queries
    assert ids.tolist() == [3, q + 7, q + 11, q + 12, q + 13, q + 7, q + 8, q + 9]


def _logged_step(module: PlaceModule, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run one training step on a batch of one tuple [1, T, 3, H, W]; return what it logged."""
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value).detach())  # type: ignore[method-assign]
    module.training_step((images, torch.arange(images.shape[1])[None]), 0)
    return logged


def test_reference_gram_rows_count_the_anchor_twice() -> None:
    assert reference_gram_rows(3, 3).tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7]
    assert reference_gram_rows(5, 1).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7]


def test_training_step_distils_over_the_reference_rows() -> None:
    torch.manual_seed(0)
    student = build_place_net("resnet18", num_clusters=4)
    teacher = build_place_net("resnet18", num_clusters=4)
    module = PlaceModule(student, optimizer=torch.optim.SGD, teacher=teacher, pos_num=2).eval()
    images = torch.rand(1, 7, 3, 32, 48)  # anchor, positive, 3 negatives, 2 soft positives
    logged = _logged_step(module, images)

    rows = [0, 1, 2, 3, 4, 0, 5, 6]
    flat = images[0, rows]
    with torch.no_grad():
        out, target = student.encode(flat), teacher.encode(flat)
        target_vlad, target_attention = teacher_targets(target.vlad, target.features)
        expected = distill_loss(out.vlad, target_vlad, out.features, target_attention)["total"]
    torch.testing.assert_close(logged["train/loss_distill"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hard", ["triplet", "sare_ind"])
def test_hard_loss_uses_the_hard_positive_not_a_soft_one(hard: str) -> None:
    torch.manual_seed(0)
    net = build_place_net("resnet18", num_clusters=4)
    module = PlaceModule(net, optimizer=torch.optim.SGD, loss={"hard": hard}, pos_num=2).eval()
    images = torch.rand(1, 6, 3, 32, 48)  # anchor, positive, 2 negatives, 2 soft positives
    logged = _logged_step(module, images)
    with torch.no_grad():
        d = net.encode(images[0]).descriptor
    kw = {"margin": module.loss.margin} if hard == "triplet" else {"tau": module.loss.tau}
    expected = hard_loss(hard, d[None, 0], d[None, 1], d[None, 2:4], **kw)
    torch.testing.assert_close(logged["train/loss_hard"], expected, rtol=1e-5, atol=1e-7)


def test_openibl_matconvnet_vgg16_start_loads_with_its_input_scale(tmp_path: Path) -> None:
    """OpenIBL starts VGG16 from the MatConvNet file of NetVLAD's authors: a bare
    ``features`` state dict (``0.weight`` ... ``28.bias``) trained on 0-255 pixels."""
    from wakd.models.backbones import build_backbone
    from wakd.models.normalization import OPENIBL_MEAN, OPENIBL_STD

    source = build_backbone("vgg16").features
    torch.nn.init.normal_(source[28].weight)
    weights = tmp_path / "vd16_offtheshelf_conv5_3_max.pth"
    torch.save(source.state_dict(), weights)
    backbone = build_backbone("vgg16", weights=weights)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.features.state_dict()[key], value), key
    torch.testing.assert_close(backbone.normalize.mean.flatten(), torch.tensor(OPENIBL_MEAN))
    torch.testing.assert_close(backbone.normalize.std.flatten(), torch.tensor(OPENIBL_STD))
    assert not any(p.requires_grad for p in backbone.features[:24].parameters())  # pretrained: conv5 only
