"""train.py experiment=pretrain_places: place pretraining of a backbone on rendered views."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from wakd.jobs.common import ensure_dataset
from wakd.jobs.train import build_teacher, build_trainer, check_launch, check_writable, save_config


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.dataset.kind != "synthcity":
        raise ValueError(
            f"place-classification pretraining renders fresh views and needs dataset=synthcity "
            f"(got dataset={cfg.dataset.name}); on real data use ImageNet weights (model.weights=imagenet)"
        )
    check_launch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    ensure_dataset(cfg.dataset)
    datamodule = hydra.utils.instantiate(cfg.datamodule)  # configs/datamodule/rendered.yaml
    datamodule.setup("fit")
    # configs/module/pretrain.yaml, the place network built from model.*
    build_module = hydra.utils.instantiate(cfg.module, _partial_=True)
    teacher, _ = build_teacher(cfg)
    module = build_module(teacher=teacher, num_classes=datamodule.num_classes)
    trainer = build_trainer(cfg)
    save_config(cfg, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.is_global_zero:
        print(f"run directory: {output_dir}")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
