"""The paper's own stage learns (issue 15): NetVLAD training on weakly supervised mined
tuples improves a pretrained network over its k-means NetVLAD start, at tiny scale."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_TRAIN, compose_cfg

from wakd.jobs import train


def _stage(pretrain_dir: Path, seed: int, data_dir: Path, run_dir: Path, extra: list[str]) -> dict[str, float]:
    return train.run(compose_cfg("train", [
        *TINY_TRAIN, "model.net.num_clusters=8", f"seed={seed}", "experiment=demo_netvlad", "teacher=none",
        f"model.weights={pretrain_dir / 'checkpoints' / 'last.ckpt'}", *extra,
    ], data_dir, run_dir))


def _score(metrics: dict[str, float]) -> float:
    # Mean of R@1/5/10 on the 50 val queries: R@1 alone has a standard error of about 0.07 here.
    return sum(metrics[f"val/R@{n}"] for n in (1, 5, 10)) / 3


def test_tuple_stage_improves_the_pretrained_network(pretrained, tiny_data_dir: Path, tmp_path: Path) -> None:
    seed, _, _, pretrain_dir = pretrained
    # The start: k-means NetVLAD on the pretrained backbone, through the same code path but
    # with nothing changing (rate 0, BatchNorm statistics kept).
    start = _stage(pretrain_dir, seed, tiny_data_dir, tmp_path / "start",
                   ["optimizer.lr=0", "module.freeze_batchnorm=true", "trainer.limit_train_batches=1"])
    # The demo's stage settings (configs/experiment/demo_netvlad.yaml), all 80 tiny queries a pass.
    after = _stage(pretrain_dir, seed, tiny_data_dir, tmp_path / "stage",
                   ["module.schedule.first_passes=3", "trainer.limit_train_batches=1.0"])
    # Measured on this fixture's checkpoints (2 cores shared with
    # other jobs: 16-25 s for the start, 191-204 s for the stage): mean R@1/5/10 went
    # 0.800 -> 0.820 (seed 0, R@1 0.50 -> 0.56) and 0.827 -> 0.847 (seed 1, R@1 0.56 -> 0.58)
    # on an AMD EPYC; on an Intel Xeon (2026-12-07, same code, float rounding differs)
    # 0.780 -> 0.780 and 0.793 -> 0.780. At 50 queries (standard error of the mean R@1/5/10
    # about 0.04) the tiny stage's gain is within noise: the stage's gain is measured at the
    # demo's scale over three seeds (bench/RESULTS.md, "Accuracy": +5.7 R@1 over its start).
    # Here: the stage trains (the start's weights change) and does not lose ground, as the
    # demo's teacher stage did before issue 15's fix (ColorJitter on the tuples).
    assert _score(after) >= _score(start) - 0.02, (start, after)
    started = torch.load(tmp_path / "start" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = torch.load(tmp_path / "stage" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    moved = [k for k, v in trained["state_dict"].items() if v.is_floating_point() and not torch.equal(v, started["state_dict"][k])]
    assert any(".pool." in k for k in moved) and any(".backbone." in k for k in moved), moved[:5]
