"""Student heads: GeM next to NetVLAD (model/head=gem), from the layer to train, eval and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, TINY_TRAIN, compose_cfg
from hydra import compose, initialize_config_dir

from wakd.export import run as export
from wakd.jobs import cluster, evaluate, train
from wakd.jobs.common import build_net, build_teacher_net, model_config_for
from wakd.losses import hard_loss
from wakd.models import PlaceNet, build_place_net
from wakd.models.gem import GeMHead
from wakd.models.inference import TOLERANCE, OnnxDescriptorNet
from wakd.models.netvlad import NetVLAD

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny city's training run (TINY_TRAIN) with a GeM head: NetVLAD's K has no place in it.
GEM_TRAIN = [o for o in TINY_TRAIN if not o.startswith("model.net.num_clusters")] + ["model/head=gem"]
TINY_EVAL = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny",
             "pca_dim=16", "num_workers=0", "batch_size=32", "plots=false"]


def gem_by_hand(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """(mean over H, W of max(x, eps)^p)^(1/p), per image and channel: [B, C, H, W] -> [B, C]."""
    return (x.clamp(min=eps) ** p).sum(dim=(2, 3)).div(x.shape[2] * x.shape[3]) ** (1 / p)


@pytest.mark.parametrize("out_dim", [None, 5])
def test_gem_head_is_the_generalised_mean_then_linear_then_l2(out_dim: int | None) -> None:
    torch.manual_seed(0)
    head = GeMHead(8, out_dim=out_dim, p=3.0)
    with torch.no_grad():
        head.p.fill_(2.5)  # a learnt exponent, not the initial one
    x = torch.randn(3, 8, 5, 7)  # negatives too: clamped to eps
    pooled = gem_by_hand(x, 2.5)
    expected = pooled if out_dim is None else pooled @ head.fc.weight.T + head.fc.bias
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.gem(x), pooled)
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (3, out_dim or 8) and head.descriptor_dim == (out_dim or 8)


def test_gem_exponent_one_is_average_pooling() -> None:
    x = torch.rand(2, 4, 6, 6) + 0.1
    head = GeMHead(4, p=1.0)
    torch.testing.assert_close(head.gem(x), x.mean(dim=(2, 3)))


def test_gem_regions_are_the_head_on_the_crops() -> None:
    torch.manual_seed(0)
    head = GeMHead(6, out_dim=4)
    x = torch.randn(2, 6, 7, 8)  # 7 rows: cells of 3, 2, 2 rows, as torch.tensor_split cuts them
    crops = [x, *x.tensor_split(3, dim=2), *x.tensor_split(3, dim=3)]  # whole, row bands, column bands
    expected = torch.stack([head(crop) for crop in crops], dim=1)
    torch.testing.assert_close(head.region_descriptors(x, grid=3), expected)
    with pytest.raises(ValueError, match="smaller than the 3x3 region grid"):
        head.region_descriptors(x[..., :2, :], grid=3)


def test_place_net_output_contract_with_gem() -> None:
    """features: the backbone's last map; descriptor [B, D]; no VLAD; regions from the same head."""
    torch.manual_seed(0)
    net = build_place_net("mobilenetv3_large", cut="stride16", proj_dim=16, head="gem", gem_dim=12).eval()
    assert isinstance(net.pool, GeMHead) and not net.has_netvlad and net.descriptor_dim == 12
    images = torch.rand(2, 3, 64, 86)
    with torch.no_grad():
        out = net.encode(images)
        with_regions = net.encode(images, regions=True)
        features = net.backbone(images)
    torch.testing.assert_close(out.features, features)
    assert out.features.shape == (2, 16, 4, 6) and out.vlad is None and out.regions is None
    torch.testing.assert_close(out.descriptor, net(images))
    assert with_regions.regions.shape == (2, 7, 12) and with_regions.vlad is None
    torch.testing.assert_close(with_regions.regions, net.pool.region_descriptors(features))
    torch.testing.assert_close(with_regions.descriptor, out.descriptor)


def test_netvlad_stays_the_default_head() -> None:
    net = build_place_net("resnet18", num_clusters=4)
    assert isinstance(net.pool, NetVLAD) and net.has_netvlad and net.descriptor_dim == 4 * 256
    out = net.encode(torch.rand(2, 3, 64, 86))
    assert out.vlad.shape == (2, 4, 256) and out.descriptor.shape == (2, 4 * 256)
    with pytest.raises(ValueError, match=r"model\.net\.head='vlad'"):
        build_place_net("resnet18", head="vlad")


def test_gem_head_trains() -> None:
    """A few optimizer steps of the hard loss on fixed tuples lower it, p included."""
    torch.manual_seed(0)
    net = build_place_net("resnet18", head="gem", gem_dim=32, bn_momentum=0.1)
    images = torch.rand(4, 4, 3, 32, 32)  # [B, anchor + positive + 2 negatives, 3, H, W]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    p_start = net.pool.p.item()
    losses = []
    for _ in range(8):
        desc = net.encode(images.flatten(0, 1)).descriptor.view(4, 4, -1)
        loss = hard_loss("triplet", desc[:, 0], desc[:, 1], desc[:, 2:], margin=0.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert net.pool.p.item() != p_start


def test_configs_choose_the_head() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        default = compose(config_name="train")
        gem = compose(config_name="train", overrides=["model=resnet18", "model/head=gem", "model.net.gem_dim=64"])
        with pytest.raises(Exception, match="num_clusters"):  # NetVLAD's K is not a GeM key
            compose(config_name="train", overrides=["model/head=gem", "model.net.num_clusters=8"])
    assert default.model.net.head == "netvlad" and default.model.net.num_clusters == 64
    assert "num_clusters" not in gem.model.net
    gem.model.weights = None
    net = build_net(gem.model)
    assert isinstance(net.pool, GeMHead) and net.descriptor_dim == 64


@pytest.fixture(scope="module")
def gem_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """train.py with a GeM student over two generations (the second with SFRS regions and
    the soft loss): (run dir, cluster dir)."""
    root = tmp_path_factory.mktemp("gem")
    clusters = root / "clusters"
    overrides = [*GEM_TRAIN, "teacher=none", "module.schedule.generations=2", "module.schedule.passes=1",
                 "trainer.limit_train_batches=2", f"paths.cluster_dir={clusters}"]
    train.run(compose_cfg("train", overrides, tiny_data_dir, root / "run"))
    return root / "run", clusters


def test_train_py_trains_a_gem_student_without_clustering(gem_run: tuple[Path, Path]) -> None:
    run_dir, clusters = gem_run
    assert not clusters.exists()  # no k-means step for GeM
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"net.pool.p"} <= ckpt["state_dict"].keys()
    assert not any("centroids" in k for k in ckpt["state_dict"])
    assert ckpt["wakd"]["model"]["net"]["head"] == "gem"
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_soft" in metrics  # generation 1 used the GeM regions


def test_gem_checkpoint_round_trip(gem_run: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = gem_run[0] / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("eval", [*TINY_EVAL, f"ckpt={ckpt}"], tmp_path / "unused", tmp_path / "run")
    net = build_net(model_config_for(cfg, str(ckpt)), str(ckpt))
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    assert isinstance(net.pool, GeMHead)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, stored[f"net.{key}"], rtol=0, atol=0, msg=key)
    # As the start of another run (model.weights): the head comes along, NetVLAD's does not.
    start = build_place_net("resnet18", weights=ckpt, head="gem")
    assert start.pool_from_weights and start.pool.p.item() == stored["net.pool.p"].item()
    assert not build_place_net("resnet18", weights=ckpt, num_clusters=8).pool_from_weights
    netvlad_file = tmp_path / "netvlad.pt"
    torch.save(build_place_net("resnet18", num_clusters=8).state_dict(), netvlad_file)
    assert not build_place_net("resnet18", weights=netvlad_file, head="gem").pool_from_weights


def test_eval_py_evaluates_a_gem_checkpoint(gem_run: tuple[Path, Path], tiny_data_dir: Path, tmp_path: Path) -> None:
    ckpt = gem_run[0] / "checkpoints" / "best.ckpt"
    evaluate.run(compose_cfg("eval", [*TINY_EVAL, f"ckpt={ckpt}"], tiny_data_dir, tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["descriptor_dim"] == 16  # PCA from the 256-d GeM descriptors
    assert 0 <= results["recall"]["1"] <= results["recall"]["20"] <= 1


def test_onnx_export_of_a_gem_student_keeps_height_and_width_dynamic(gem_run: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = gem_run[0] / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt={ckpt}", f"out={tmp_path / 'gem.onnx'}",
                                                       "image_size=[64,86]"])
    out = export(cfg)
    net = build_net(model_config_for(cfg, str(ckpt)), str(ckpt)).eval()
    exported = OnnxDescriptorNet(out)
    for size in ((64, 86), (96, 128)):  # the traced size and another one
        images = torch.rand(3, 3, *size)
        with torch.no_grad():
            expected = net(images)
        got = exported(images)
        assert got.shape == expected.shape == (3, 256)
        assert (got - expected).abs().max().item() <= TOLERANCE


def test_cluster_py_says_a_gem_head_has_nothing_to_cluster(tiny_data_dir: Path, tmp_path: Path) -> None:
    overrides = ["dataset=synthcity", "dataset.generate.preset=tiny", "model=resnet18", "model.weights=null",
                 "model/head=gem", f"paths.cluster_dir={tmp_path / 'clusters'}"]
    cfg = compose_cfg("cluster", overrides, tiny_data_dir, tmp_path / "run")
    assert Path(cfg.centroids).name == "resnet18_layer3_synthcity_gem-head-has-no-centroids"
    with pytest.raises(ValueError, match="nothing to cluster"):
        cluster.run(cfg)
    assert not (tmp_path / "clusters").exists()


def test_init_netvlad_leaves_a_gem_head_alone(tmp_path: Path) -> None:
    net: PlaceNet = build_place_net("resnet18", head="gem")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cluster.init_netvlad(net, tmp_path / "missing.hdf5", cluster=lambda path: pytest.fail("clustered"))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_gem_checkpoint_is_a_teacher_by_the_architecture_it_stores(
    gem_run: tuple[Path, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """teacher=resnet18 teacher.ckpt=<a GeM run>: the teacher config's NetVLAD head gives way
    to the checkpoint's GeM head, and a NetVLAD student distils its descriptors' Gram."""
    ckpt = gem_run[0] / "checkpoints" / "best.ckpt"
    overrides = [*TINY_TRAIN, "teacher=resnet18", f"teacher.ckpt={ckpt}", "trainer.limit_train_batches=2",
                 "module.schedule.first_passes=1"]
    cfg = compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run")
    assert cfg.teacher.net.num_clusters == 64  # the config's head, not the checkpoint's
    teacher = build_teacher_net(cfg.teacher)
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    assert isinstance(teacher.pool, GeMHead)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, stored[f"net.{key}"], rtol=0, atol=0, msg=key)
    train.run(cfg)
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_distill" in metrics
    student = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert student["wakd"]["teacher"]["ckpt"] == str(ckpt)
    assert student["wakd"]["model"]["net"]["head"] == "netvlad"
