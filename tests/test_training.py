"""Training on the tiny synthetic city: baseline, WAKD, resume, multirun, DDP simulation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose_cfg

from wakd.jobs import train
from wakd.jobs.common import build_net


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def baseline_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    cfg = compose_cfg("train", [*TINY_TRAIN, "teacher=none"], tiny_data_dir, run_dir)
    metrics = train.run(cfg)
    assert set(metrics) >= {"val/R@1", "val/R@5", "val/R@10"}
    return run_dir


def test_baseline_writes_checkpoints_and_metrics(baseline_run: Path) -> None:
    ckpt = baseline_run / "checkpoints"
    assert (ckpt / "last.ckpt").is_file() and (ckpt / "best.ckpt").is_file()
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in state["state_dict"])  # nothing but the student
    assert state["wakd"]["model"]["name"] == "resnet18"
    assert (baseline_run / "config.yaml").is_file()
    metrics = (baseline_run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_hard" in metrics and "val/R@5" in metrics


def test_wakd_run_freezes_teacher_and_trains_student(
    baseline_run: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    teacher_ckpt = baseline_run / "checkpoints" / "last.ckpt"
    overrides = [
        *TINY_TRAIN,
        "model=mobilenetv3_large", "model.weights=null",
        "model.net.cut=stride16",
        "model.net.proj_dim=64",
        "model.net.num_clusters=8",
        "teacher=resnet18",
        "teacher.net.num_clusters=8",
        f"teacher.ckpt={teacher_ckpt}",
    ]
    cfg = compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run")
    teacher_before = _state(teacher_ckpt)
    L.seed_everything(cfg.seed)  # the same initial student train.run builds
    student = build_net(cfg.model)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    metrics = train.run(cfg)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert _state(teacher_ckpt).keys() == teacher_before.keys()
    for key, value in _state(teacher_ckpt).items():
        assert torch.equal(value, teacher_before[key]), f"teacher weight {key} changed"
    after = _state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, student_before[k[4:]])]
    assert any("backbone" in k for k in changed), "student backbone did not train"
    stored = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert stored["wakd"]["teacher"]["sha256"] and stored["wakd"]["teacher"]["ckpt"] == str(teacher_ckpt)
    metrics_csv = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_distill" in metrics_csv


def test_frozen_batchnorm_keeps_its_statistics_while_the_rest_trains(
    baseline_run: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    weights = baseline_run / "checkpoints" / "last.ckpt"
    overrides = [*TINY_TRAIN, "teacher=none", "module.freeze_batchnorm=true", f"model.weights={weights}"]
    train.run(compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run"))
    before, after = _state(weights), _state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    statistics = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(after[k], before[k]) for k in statistics)
    assert not torch.equal(after["net.backbone.layer3.0.conv1.weight"], before["net.backbone.layer3.0.conv1.weight"])


def test_batchnorm_momentum_option(tiny_data_dir: Path, tmp_path: Path) -> None:
    def momenta(*overrides: str) -> set[float]:
        cfg = compose_cfg("train", ["model=mobilenetv3_large", "model.weights=null", "model.net.cut=stride16", *overrides], tiny_data_dir, tmp_path)
        return {m.momentum for m in build_net(cfg.model).backbone.features.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    assert momenta() == {0.01}  # torchvision's
    assert momenta("model.net.bn_momentum=0.1") == {0.1}


def test_missing_teacher_checkpoint_says_how_to_make_one(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("train", [*TINY_TRAIN, "teacher=vgg16"], tiny_data_dir, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="teacher=none"):
        train.run(cfg)


def test_resume_from_last_checkpoint(baseline_run: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """Two rounds in one go equal one round, then a resume for the second."""
    two_rounds = [*TINY_TRAIN, "teacher=none", "module.schedule.first_passes=2", "datamodule.augment=false"]
    full = compose_cfg("train", two_rounds, tiny_data_dir, tmp_path / "full")
    train.run(full)
    first = compose_cfg("train", [*two_rounds[:-2], "datamodule.augment=false"], tiny_data_dir, tmp_path / "part")
    train.run(first)
    resumed = compose_cfg(
        "train", [*two_rounds, f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
        tiny_data_dir, tmp_path / "part",
    )
    train.run(resumed)
    a = _state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _state(tmp_path / "part" / "checkpoints" / "last.ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs after resume")


def test_multirun_sweep_gives_one_run_per_combination(tiny_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m",
        *(o for o in TINY_TRAIN if not o.startswith("callbacks.")),
        "logger=none", "callbacks=none", "trainer.enable_checkpointing=false",
        f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}", "trainer.limit_train_batches=1",
        "datamodule.neg_num=2,3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert runs == ["0", "1"]
    for run in runs:
        assert (sweep / run / "config.yaml").is_file()
