"""train.py: NetVLAD baseline (teacher=none) or WAKD distillation (teacher=<arch>)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from wakd.data.datamodule import TupleDataModule
from wakd.distributed import check_shared_run_dir, external_launcher
from wakd.jobs.cluster import compute_centroids, init_netvlad
from wakd.jobs.common import build_teacher_net, ensure_dataset
from wakd.models.place_net import PlaceNet
from wakd.modules.place_module import PlaceModule
from wakd.pretrained import check_start_files
from wakd.resolvers import file_digest
from wakd.zoo import ZooTeacher


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def check_writable(directory: str | Path) -> None:
    """Fail before training when the run directory cannot be written (read-only disk, quota)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # One probe per process: the ranks of a multi-process run probe one directory at once.
        probe = directory / f".write_test.{socket.gethostname()}.{os.getpid()}"
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to the run directory {directory}: {exc.strerror or exc}. "
                      "Choose another with paths.log_dir=DIR or free some space.") from exc


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the run's callbacks and loggers."""
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
        **overrides,
    )


def build_teacher(cfg: DictConfig) -> tuple[PlaceNet | ZooTeacher | None, dict]:
    """The teacher network (None for teacher=none) and what checkpoints record of it: a wakd
    place network from ``teacher.ckpt``, or a published model from ``teacher.weights``
    (configs/teacher/<family>.yaml), which sees the images at its ``teacher.image_size``."""
    if cfg.get("teacher") is None:
        return None, {}
    teacher = build_teacher_net(cfg.teacher)
    if isinstance(teacher, ZooTeacher):
        weights = Path(cfg.teacher.weights)
        return teacher, {"name": cfg.teacher.name, "ckpt": str(weights), "sha256": file_digest(weights),
                         "description": teacher.description}
    ckpt = Path(cfg.teacher.ckpt)
    return teacher, {"name": cfg.teacher.name, "ckpt": str(ckpt), "sha256": file_digest(ckpt)}


def check_launch(cfg: DictConfig) -> None:
    """What a run started as several processes needs before the first of them writes anything:
    one run directory for all of them (:func:`wakd.distributed.check_shared_run_dir`) and as
    many processes as ``trainer.devices`` x ``trainer.num_nodes``, named before Lightning's
    less specific error."""
    if HydraConfig.initialized():
        check_shared_run_dir(HydraConfig.get())
    launched = external_launcher()
    if launched is None:
        return
    launcher, processes = launched
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and devices * nodes != processes:
        raise ValueError(
            f"{launcher} started {processes} processes, but trainer.devices={devices} x "
            f"trainer.num_nodes={nodes} = {devices * nodes}: set trainer.devices to the processes "
            "per node and trainer.num_nodes to the nodes"
        )


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: Path) -> None:
    """The composed config, written once (by global rank 0) however many processes run."""
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)


def build_datamodule(cfg: DictConfig) -> TupleDataModule:
    """configs/datamodule/tuples.yaml over the dataset's splits."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    return hydra.utils.instantiate(cfg.datamodule, dataset=dataset, image_size=dataset["image_size"], seed=cfg.seed)


def module_factory(cfg: DictConfig) -> Callable[..., L.LightningModule]:
    """configs/module/<option> with the network ``model.*`` builds (now: before the teacher,
    so that a seed draws the same random weights) and the optimizer and scheduler
    factories; called with what only the run knows."""
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return functools.partial(
        hydra.utils.instantiate(cfg.module, _partial_=True),
        net=hydra.utils.instantiate(cfg.model.net),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=scheduler,
    )


def run(cfg: DictConfig) -> dict[str, float]:
    check_launch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    check_start_files(cfg)
    ensure_dataset(cfg.dataset)

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    build_module = module_factory(cfg)
    teacher, teacher_info = build_teacher(cfg)
    module: PlaceModule = build_module(
        teacher=teacher,
        teacher_info=teacher_info,
        teacher_cache=bool(cfg.teacher and cfg.teacher.cache),
        pos_num=datamodule.pos_num,
        rounds_per_pass=datamodule.rounds_per_pass,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
    )
    # A resumed run restores NetVLAD from its checkpoint; a trained place network as the
    # start (model.weights) brings its own.
    if not cfg.ckpt_path and not module.net.pool_from_weights:
        init_netvlad(module.net, cfg.centroids, cluster=lambda path: compute_centroids(
            module.net, cfg.dataset, path, num_images=cfg.cluster.num_images,
            features_per_image=cfg.cluster.features_per_image, seed=cfg.seed,
            num_workers=cfg.datamodule.num_workers, skip_corrupt=cfg.datamodule.skip_corrupt,
        ))
    trainer = build_trainer(cfg, max_epochs=module.schedule.total_rounds)
    save_config(cfg, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero:
        print(f"run directory: {output_dir}")
    return metrics
