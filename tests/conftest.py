"""Shared fixtures: the tiny synthetic city and Hydra composition without a Hydra run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from wakd.resolvers import register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Small enough for CI: tiny city images (64x86), K=8 clusters, few images and steps.
TINY_TRAIN = [
    "dataset=synthcity",
    "dataset.image_size=[64,86]",
    "dataset.generate.preset=tiny",
    "model=resnet18", "model.weights=null",
    "model.net.num_clusters=8",
    "module.schedule.generations=1",
    "datamodule.neg_pool=40",
    "datamodule.num_workers=0",
    "datamodule.eval_batch_size=32",
    "cluster.num_images=40",
    "cluster.features_per_image=20",
    "callbacks.progress_bar=null",
    "trainer.limit_train_batches=3",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


# Place pretraining of a ResNet18 on rendered views of the tiny city (tests/test_pretrain.py).
PRETRAIN = [
    "experiment=pretrain_places",
    "dataset.image_size=[64,86]",
    "dataset.generate.preset=tiny",
    "model=resnet18", "model.weights=null",
    "trainer.max_steps=300",
    "trainer.limit_train_batches=300",
    "datamodule.batch_size=16",
    "datamodule.num_workers=0",
    "callbacks.progress_bar=null",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: a second intra-op thread mostly waits for a busy core (opt in per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wakd.synth.synthcity import generate_city

    data_dir = tmp_path_factory.mktemp("data")
    generate_city(data_dir, preset="tiny", seed=0, progress=False)
    return data_dir


def compose_cfg(name: str, overrides: list[str], data_dir: Path, run_dir: Path) -> DictConfig:
    """Compose configs/<name>.yaml as the entry script would, writing into ``run_dir``."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name=name,
            overrides=[
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={run_dir.parent / 'logs'}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="session", params=[0, 1], ids=lambda seed: f"seed{seed}")
def pretrained(request: pytest.FixtureRequest, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One 300-step pretraining per seed, shared by the tests of pretraining and of the
    tuple stage that starts from it: (seed, cfg, metrics, run dir)."""
    from wakd.synth import pretrain_job as pretrain

    seed = request.param
    run_dir = tmp_path_factory.mktemp(f"pretrain{seed}") / "run"
    cfg = compose_cfg("train", [*PRETRAIN, f"seed={seed}"], tiny_data_dir, run_dir)
    return seed, cfg, pretrain.run(cfg), run_dir
