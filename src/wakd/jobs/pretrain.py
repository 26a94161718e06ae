"""train.py experiment=pretrain_places: place pretraining of a backbone on rendered views."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from wakd.data.rendered_datamodule import RenderedPlacesDataModule
from wakd.jobs.common import build_net, ensure_dataset
from wakd.jobs.train import build_teacher, check_writable, instantiate_group
from wakd.modules.pretrain import PlacePretrainModule


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.dataset.kind != "synthcity":
        raise ValueError(
            f"place-classification pretraining renders fresh views and needs dataset=synthcity "
            f"(got dataset={cfg.dataset.name}); on real data use ImageNet weights (model.weights=imagenet)"
        )
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    ensure_dataset(cfg.dataset)
    p = cfg.pretrain
    datamodule = RenderedPlacesDataModule(
        cfg.dataset.root, cfg.dataset.image_size, cell_size=p.cell_size,
        batch_size=p.batch_size, num_workers=p.num_workers, seed=cfg.seed,
        views=2 if p.objective == "contrastive" else 1,
    )
    backbone = build_net(cfg.model).backbone
    teacher, _ = build_teacher(cfg)
    if teacher is not None and p.objective != "contrastive":
        raise ValueError("distillation during pretraining (teacher=<arch>) needs pretrain.objective=contrastive")
    module = PlacePretrainModule(
        backbone, backbone.out_channels, datamodule.num_classes, objective=p.objective,
        temperature=p.temperature, embed_dim=p.embed_dim,
        scale=p.scale, margin=p.margin, lr=p.lr, head_lr=p.head_lr,
        schedule=p.schedule, warmup_steps=p.warmup_steps, total_steps=p.steps,
        teacher=teacher, distill_weight=cfg.distill.weight, distill_vlad=cfg.distill.vlad,
        distill_attention=cfg.distill.attention, distill_center=cfg.distill.center, eval_ns=cfg.eval_ns,
    )
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
        max_epochs=-1,
        max_steps=p.steps,
        limit_train_batches=p.steps_per_epoch,  # the stream is endless: an "epoch" ends validation-wise
        reload_dataloaders_every_n_epochs=0,
    )
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    print(f"run directory: {output_dir}")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
