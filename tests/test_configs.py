"""Every option of every config group composes, and bad keys fail the way Hydra says."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("primary", ["train", "eval", "cluster"])
def test_every_group_option_composes(primary: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        base = compose(config_name=primary)
        for group in GROUPS:
            if group not in base and group not in ("experiment",):
                continue
            for option in _options(group):
                extra = ["dataset.root=/data/x"] if (group, option) == ("dataset", "folder") else []
                if group == "experiment":
                    if primary != "train":
                        continue
                    overrides = [f"experiment={option}"]
                else:
                    overrides = [f"{group}={option}", *extra]
                cfg = compose(config_name=primary, overrides=overrides)
                # Resolve everything except Hydra's own runtime values.
                container = OmegaConf.to_container(cfg, resolve=False)
                assert container, (group, option)
                for key in ("dataset", "model", "teacher"):
                    if cfg.get(key) is not None:
                        OmegaConf.to_container(cfg[key], resolve=True)


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
