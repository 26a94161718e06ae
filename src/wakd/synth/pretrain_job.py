"""train.py experiment=pretrain_places: place pretraining of a backbone on rendered views."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from wakd.jobs.common import ensure_dataset
from wakd.jobs.train import (
    build_teacher,
    build_trainer,
    check_launch,
    check_writable,
    module_factory,
    save_config,
)
from wakd.synth.pretrain_module import VIEWS_PER_OBJECTIVE
from wakd.synth.rendered_datamodule import RenderedPlacesDataModule


def build_datamodule(cfg: DictConfig) -> RenderedPlacesDataModule:
    """configs/datamodule/rendered.yaml over the city, as many views per place as
    ``module.objective`` trains on (an unknown objective: the module says so)."""
    return hydra.utils.instantiate(
        cfg.datamodule,
        root=cfg.dataset.root,
        image_size=list(cfg.dataset.image_size),
        seed=cfg.seed,
        views=VIEWS_PER_OBJECTIVE.get(cfg.module.objective, 1),
    )


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.dataset.kind != "synthcity":
        raise ValueError(
            f"place-classification pretraining renders fresh views and needs dataset=synthcity "
            f"(got dataset={cfg.dataset.name}); on real data use ImageNet weights (model.weights=imagenet)"
        )
    if cfg.get("teacher") is not None and "zoo_family" in cfg.teacher:
        raise ValueError(
            f"experiment=pretrain_places distils from wakd teachers only (teacher=vgg16 ...), not "
            f"teacher={cfg.teacher.name}: pretrain without it (teacher=none) and distil from it in the NetVLAD stage"
        )
    check_launch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    ensure_dataset(cfg.dataset)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    build_module = module_factory(cfg)
    teacher, _ = build_teacher(cfg)
    module = build_module(teacher=teacher, num_classes=datamodule.num_classes)
    trainer = build_trainer(cfg)
    save_config(cfg, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.is_global_zero:
        print(f"run directory: {output_dir}")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
