"""train.py: NetVLAD baseline (teacher=none) or WAKD distillation (teacher=<arch>)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from wakd.jobs.cluster import compute_centroids
from wakd.jobs.common import build_net, ensure_dataset, file_digest
from wakd.modules.place_module import GenerationSchedule, PlaceModule
from wakd.pretrained import check_start_files


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def check_writable(directory: str | Path) -> None:
    """Fail before training when the run directory cannot be written (read-only disk, quota)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to the run directory {directory}: {exc.strerror or exc}. "
                      "Choose another with paths.log_dir=DIR or free some space.") from exc


def build_teacher(cfg: DictConfig) -> tuple[Any, dict]:
    if cfg.get("teacher") is None:
        return None, {}
    ckpt = Path(cfg.teacher.ckpt)
    teacher = build_net(cfg.teacher, str(ckpt))
    return teacher, {"name": cfg.teacher.name, "ckpt": str(ckpt), "sha256": file_digest(ckpt)}


def run(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    check_start_files(cfg)
    ensure_dataset(cfg.dataset)

    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.setup("fit")
    net = build_net(cfg.model)
    # A resumed run restores NetVLAD from its checkpoint; a trained place network as the
    # start (model.weights) brings its own.
    if not cfg.ckpt_path and not net.pool_from_weights:
        centroids = Path(cfg.centroids)
        if not centroids.is_file():
            compute_centroids(net, cfg.dataset, centroids, num_images=cfg.cluster.num_images,
                              features_per_image=cfg.cluster.features_per_image, seed=cfg.seed,
                              num_workers=cfg.datamodule.num_workers,
                              skip_corrupt=cfg.datamodule.skip_corrupt)
        net.pool.init_from_hdf5(centroids)
    teacher, teacher_info = build_teacher(cfg)

    schedule = GenerationSchedule(
        count=cfg.train.generations,
        first_passes=cfg.train.first_passes,
        passes=cfg.train.passes,
        rounds_per_pass=datamodule.rounds_per_pass,
    )
    module = PlaceModule(
        net,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        hard_loss_name=cfg.loss.hard,
        tau=cfg.loss.tau,
        margin=cfg.loss.margin,
        soft_weight=cfg.loss.soft_weight,
        tau_per_generation=cfg.loss.tau_per_generation,
        schedule=schedule,
        teacher=teacher,
        teacher_info=teacher_info,
        distill_weight=cfg.distill.weight,
        distill_vlad=cfg.distill.vlad,
        distill_attention=cfg.distill.attention,
        distill_center=cfg.distill.center,
        teacher_cache=bool(cfg.teacher.get("cache", False)) if teacher is not None else False,
        pos_num=cfg.datamodule.pos_num,
        eval_ns=cfg.eval_ns,
        val_every_n_rounds=cfg.train.val_every_n_rounds,
        freeze_batchnorm=cfg.train.freeze_batchnorm,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
    )
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
        max_epochs=schedule.total_rounds,
    )
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"run directory: {output_dir}")
    return metrics
