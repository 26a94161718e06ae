"""Place pretraining on rendered views of the tiny city learns, and its backbone loads."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import PRETRAIN, TINY_TRAIN, compose_cfg

from wakd.eval.retrieval import evaluate_split
from wakd.jobs import evaluate, train
from wakd.jobs.common import build_net
from wakd.models.place_net import build_place_net
from wakd.synth import pretrain_job as pretrain
from wakd.synth.embedding import PlaceEmbedding
from wakd.synth.embedding_losses import multi_positive_info_nce
from wakd.synth.lr_schedules import warmup_then
from wakd.synth.pretrain_module import PlacePretrainModule
from wakd.synth.rendered_datamodule import RenderedPlacesDataModule

TINY_EVAL = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny", "num_workers=0"]


def test_info_nce_matches_hand_computation() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    b = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    expected = 0.0
    for logits in (a @ b.T / 0.5, (a @ b.T / 0.5).T):
        for i in range(3):
            positives = [j for j in range(3) if labels[j] == labels[i]]
            log_p = logits[i] - torch.logsumexp(logits[i], 0)
            expected += -sum(log_p[j] for j in positives) / len(positives) / 3
    assert multi_positive_info_nce(a, b, labels, 0.5) == pytest.approx(float(expected) / 2, rel=1e-5)


def _val_r1(net: torch.nn.Module, root: Path) -> float:
    dm = RenderedPlacesDataModule(str(root), (64, 86))
    dm.setup()
    result = evaluate_split(net, dm.val_split, dm.val_images(), ns=(1,), num_workers=0, progress=False)
    return result.recall[1]


def test_pretraining_lowers_loss_and_beats_untrained(pretrained, tiny_data_dir: Path) -> None:
    seed, cfg, metrics, run_dir = pretrained
    rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("train/loss")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, "training loss did not fall"

    L.seed_everything(seed)
    backbone = build_net(cfg.model).backbone
    untrained = _val_r1(PlaceEmbedding(backbone, 256), tiny_data_dir / "synthcity" / "raw")
    # Measured on the tiny city (50 val queries, few places, so a high untrained R@1):
    # seeds 0 / 1 went from 0.26 / 0.38 to 0.36 / 0.52 after 300 steps.
    assert metrics["val/R@1"] > untrained + 0.05, (metrics, untrained)


def test_trained_teacher_beats_untrained_network_on_test_split(pretrained, tiny_data_dir: Path, tmp_path: Path) -> None:
    """The demo's teacher recipe at tiny scale: pretraining, then NetVLAD training (teacher=none),
    evaluated by eval.py on the held-out test split against the same untrained network."""
    seed, _, _, pretrain_dir = pretrained
    model = ["model=resnet18", "model.weights=null", "model.net.num_clusters=8", f"seed={seed}"]
    teacher_dir = tmp_path / "teacher"
    train.run(compose_cfg("train", [
        *TINY_TRAIN, *model, "experiment=demo_netvlad", "teacher=none", "module.schedule.first_passes=1", "optimizer.lr=1e-4",
        f"model.weights={pretrain_dir / 'checkpoints' / 'last.ckpt'}",
    ], tiny_data_dir, teacher_dir))
    recall = {}
    for name, ckpt in (("untrained", None), ("teacher", teacher_dir / "checkpoints" / "best.ckpt")):
        overrides = [*TINY_EVAL, *model, "pca=false", *([f"ckpt={ckpt}"] if ckpt else [])]
        recall[name] = evaluate.run(compose_cfg("eval", overrides, tiny_data_dir, tmp_path / name))[1]
    # Measured (test split, 50 queries, R@1 standard error about 0.07): untrained 0.28 / 0.28,
    # teacher 0.48 / 0.52 (seeds 0 / 1) on an AMD EPYC; on an Intel Xeon (2026-12-07, same
    # code: float rounding differs) seed 1 gave untrained 0.32, teacher 0.42. The margin is
    # the pretraining test's: a paired difference's standard error is about 0.09 here, and
    # the demo measures the teacher's gain at scale (bench/RESULTS.md, "Accuracy").
    assert recall["teacher"] > recall["untrained"] + 0.05, recall


def test_pretraining_checkpoint_loads_as_model_weights(tiny_data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_cfg("train", [*PRETRAIN, "trainer.max_steps=2", "trainer.limit_train_batches=2"], tiny_data_dir, run_dir)
    pretrain.run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net = build_net(compose_cfg("train", ["model=resnet18", "model.weights=null", f"model.weights={ckpt}"], tiny_data_dir, tmp_path / "x").model)
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, saved[f"net.backbone.{key}"]), key


def _lr_factors(steps: list[int], **schedule: object) -> list[float]:
    """Learning rate / base learning rate at each of ``steps`` (optimizer steps taken)."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = warmup_then(optimizer, **schedule)
    factors = []
    for step in range(max(steps) + 1):
        if step in steps:
            factors.append(optimizer.param_groups[0]["lr"] / 1e-3)
        optimizer.step()
        scheduler.step()
    return factors


def test_learning_rate_schedule_warms_up_then_follows_a_cosine() -> None:
    steps = [0, 9, 60, 110]
    lr_factor = dict(zip(steps, _lr_factors(steps, decay="cosine", warmup_steps=10, total_steps=110), strict=True))
    assert lr_factor[0] == pytest.approx(0.1)
    assert lr_factor[9] == pytest.approx(1.0)
    assert lr_factor[60] == pytest.approx(0.5)  # half way through the decay
    assert lr_factor[110] == pytest.approx(0.0, abs=1e-12)
    assert _lr_factors([0, 3, 500], warmup_steps=4) == pytest.approx([0.25, 1.0, 1.0])


@pytest.mark.parametrize("teacher_head", ["netvlad", "gem"])  # GeM: the Gram of its descriptors
def test_pretraining_with_teacher_adds_distillation_and_leaves_teacher_alone(teacher_head: str) -> None:
    torch.manual_seed(0)
    teacher = build_place_net("resnet18", cut="layer3", num_clusters=4, head=teacher_head)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_place_net("mobilenetv3_large", cut="stride16", proj_dim=16, num_clusters=4)
    images, labels = torch.rand(4, 2, 3, 64, 86), torch.tensor([0, 1, 2, 3])
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    plain = PlacePretrainModule(student, adam, warmup_then, num_classes=4)
    wakd = PlacePretrainModule(student, adam, warmup_then, num_classes=4, teacher=teacher, distill={"weight": 100.0})
    wakd.load_state_dict(plain.state_dict())  # the same student and head
    wakd.log = plain.log = lambda *args, **kwargs: None  # no trainer attached
    plain.train(), wakd.train()
    loss_plain, loss_wakd = plain.training_step((images, labels), 0), wakd.training_step((images, labels), 0)
    assert loss_wakd > loss_plain  # + 100 x a non-negative Gram MSE, here non-zero
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    optimizer = wakd.configure_optimizers()["optimizer"]
    loss_wakd.backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("teacher") for k in wakd.state_dict())  # never checkpointed
