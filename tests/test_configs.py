"""Every option of every config group composes and instantiates, and bad keys fail the way Hydra says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from conftest import CONFIGS, REPO
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from wakd.jobs import train
from wakd.jobs.common import build_zoo_model
from wakd.resolvers import register_resolvers
from wakd.synth import pretrain_job
from wakd.zoo import ZooLoadError

register_resolvers()

GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
# Options that only work with another group's option (as their experiment pairs them):
# the rendered views are built by the pretraining job, for module=pretrain.
COMPANIONS = {("datamodule", "rendered"): ["module=pretrain"], ("dataset", "folder"): ["dataset.root=/data/x"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _small(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """Random weights and few clusters, so that building every network stays fast; no GPU
    needed (a GPU option is instantiated with the CPU accelerator where none is present)."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        for key in ("model", "teacher"):
            node = cfg.get(key)
            if node is not None and "weights" in node:
                node.weights = None
            if node is not None and "num_clusters" in node.get("net", {}):
                node.net.num_clusters = 4
        if "trainer" in cfg and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            cfg.trainer.accelerator = "cpu"
    return cfg


ALL = ("paths", "dataset", "model", "teacher", "datamodule", "optimizer", "module", "trainer", "logger", "callbacks")
# What instantiating one group's option builds (scale and scheduler options change another node).
BUILDS = {"scale": ("dataset",), "scheduler": ("optimizer",), "experiment": ALL}


def _instantiate(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """Instantiate the nodes ``keys`` of ``cfg`` as the jobs do (the run-time arguments of
    the modules given dummy values; data-only nodes fully resolved); the objects by key."""
    made: dict[str, Any] = {}
    keys = tuple(k for k in keys if k in cfg)
    for key in ("paths", "dataset"):
        if key in keys and cfg.get(key) is not None:
            made[key] = OmegaConf.to_container(cfg[key], resolve=True)
    for key in ("model", "teacher"):
        if key in keys and cfg.get(key) is not None:
            if "zoo_family" in cfg[key]:  # a published model: without its file, one clear error
                with pytest.raises(ZooLoadError, match=rf"{key}\.weights=PATH"):
                    build_zoo_model(cfg[key])
                continue
            made[key] = hydra.utils.instantiate(cfg[key].net)
    pretraining = "module" in cfg and cfg.module._target_.endswith("PlacePretrainModule")
    job = pretrain_job if pretraining else train
    if "datamodule" in keys:
        made["datamodule"] = job.build_datamodule(cfg)
    if "optimizer" in keys:
        made["optimizer"] = hydra.utils.instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
        made["scheduler"] = scheduler(made["optimizer"]) if scheduler is not None else None
    if "module" in keys:
        made["module"] = train.module_factory(cfg)(**({"num_classes": 3} if pretraining else {"rounds_per_pass": 2}))
    if "trainer" in keys:
        made["trainer"] = hydra.utils.instantiate(cfg.trainer)
    for key in ("logger", "callbacks"):
        if key in keys and cfg.get(key):
            made[key] = [hydra.utils.instantiate(node) for node in cfg[key].values() if node]
    return made


@pytest.mark.parametrize("primary", ["train", "eval", "cluster"])
def test_every_group_option_composes_and_instantiates(primary: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        base = compose(config_name=primary)
        for group in GROUPS:
            if group not in base and group not in ("experiment",):
                continue
            for option in _options(group):
                if group == "experiment":
                    if primary != "train":
                        continue
                    overrides = [f"experiment={option}"]
                else:
                    overrides = [f"{group}={option}", *COMPANIONS.get((group, option), [])]
                cfg = _small(compose(config_name=primary, overrides=overrides), tmp_path)
                assert OmegaConf.to_container(cfg, resolve=False), (group, option)
                for key in ("dataset", "model", "teacher"):  # every interpolation resolves
                    if cfg.get(key) is not None:
                        OmegaConf.to_container(cfg[key], resolve=True)
                for key, made in _instantiate(cfg, BUILDS.get(group, (group,))).items():
                    assert not isinstance(made, DictConfig), (group, option, key)  # a _target_ left unbuilt


def test_modules_are_built_from_their_config(tmp_path: Path) -> None:
    """The keys users set (module.*, optimizer.*, scheduler.*, trainer.max_steps) reach the
    modules, and the hyper-parameters Lightning saves are plain."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        place = _small(compose(config_name="train", overrides=[
            "module.loss.hard=triplet", "module.distill.center=true", "module.schedule.generations=2",
            "optimizer.lr=0.5",
        ]), tmp_path)
        pretrain = _small(compose(config_name="train", overrides=[
            "experiment=pretrain_places", "module.objective=cosface", "optimizer.lr=0.25",
            "scheduler.decay=cosine", "scheduler.warmup_steps=2", "trainer.max_steps=10",
        ]), tmp_path)
    module = _instantiate(place, ALL)["module"]
    assert module.loss.hard == "triplet" and module.distill.center and module.schedule.generations == 2
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == 0.5
    assert all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in module.hparams.values())
    made = _instantiate(pretrain, ALL)
    assert made["datamodule"].views == 1  # cosface: one view per sample
    setup = made["module"].configure_optimizers()
    assert setup["optimizer"].param_groups[0]["initial_lr"] == 0.25
    assert isinstance(setup["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.SequentialLR)
    assert made["trainer"].max_steps == 10


def test_paths_defaults() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.paths.data_dir.endswith("datasets/data")
    assert cfg.paths.log_dir.endswith("logs")
    assert cfg.dataset.name == "pitts30k" and cfg.teacher is None


def test_scale_selects_pittsburgh_size() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["dataset=pitts", "scale=250k"])
    assert cfg.dataset.name == "pitts250k" and cfg.dataset.scale == "250k"


@pytest.mark.parametrize(
    ("override", "message"),
    [("datamodule.no_such_key=1", "no_such_key"), ("model=no_such_model", "no_such_model")],
)
def test_unknown_key_or_option_fails(override: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), override, "--cfg", "job"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
