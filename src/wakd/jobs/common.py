"""Pieces the train / eval / cluster jobs share: dataset presence, model building."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from wakd import zoo
from wakd.data.datasets import PlaceSplit, load_split
from wakd.distributed import external_launcher
from wakd.models.checkpoints import load_place_net_weights, load_torch_file
from wakd.zoo import ZooTeacher


def ensure_dataset(dataset: DictConfig) -> None:
    """Generate a dataset that names a generator (the synthetic city) on first use; real
    datasets must already be in place."""
    generate = dataset.get("generate")
    if not generate or Path(dataset.root).is_dir():
        return
    out_dir = Path(dataset.root).parents[1]  # <data_dir>/synthcity/raw -> <data_dir>
    launched = external_launcher()
    if launched is not None:  # every process would render the same files at once
        raise ValueError(
            f"dataset.root {dataset.root} does not exist and {launched[0]} started {launched[1]} "
            f"processes: generate the city once first (python -m wakd.synth.synthcity --out {out_dir} "
            f"--preset {generate.preset} --seed {int(generate.seed)})"
        )
    # A config path, not an import: the paper's code never imports the demo stack (wakd.synth).
    generator = hydra.utils.get_method(generate.function)
    generator(out_dir, preset=generate.preset, seed=int(generate.seed))


def load_dataset_split(dataset: DictConfig, which: str) -> PlaceSplit:
    """The split used for ``which`` in {train, val, test} (names as the dataset config maps them)."""
    split = dataset.splits[which]
    if split is None:
        raise ValueError(f"dataset '{dataset.name}' has no {which} split (it is evaluation-only)")
    ensure_dataset(dataset)
    return load_split(
        dataset.kind, dataset.root, split,
        scale=dataset.get("scale"), pos_dist_thr=dataset.get("pos_dist_thr"),
    )


def checkpoint_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model config a wakd checkpoint was trained with (None for foreign checkpoints)."""
    if Path(path).suffix == ".safetensors":  # tensors only: no place for a model config
        return None
    state = load_torch_file(path)  # refuses pickled code (ValueError) instead of running it
    if isinstance(state, dict) and isinstance(state.get("wakd"), dict):
        return state["wakd"].get("model") or None
    return None


def build_net(model_cfg: DictConfig | dict, ckpt: str | None = None) -> torch.nn.Module:
    """Instantiate a descriptor network and load ``ckpt`` into it (any supported layout);
    a published model (``zoo_family``) from its own ``weights`` file."""
    if "zoo_family" in model_cfg:
        if ckpt:
            raise ValueError(f"ckpt={ckpt}: a published model loads its own file, model.weights=PATH; drop ckpt")
        return build_zoo_model(model_cfg)
    net_cfg = model_cfg.get("net", model_cfg)
    overrides = {"weights": None} if ckpt and "weights" in net_cfg else {}
    # With a checkpoint every weight is overwritten: never load ImageNet/pretraining files first.
    net = hydra.utils.instantiate(net_cfg, **overrides)
    if ckpt:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        load_place_net_weights(net, ckpt)
    return net


def build_zoo_model(model_cfg: DictConfig) -> torch.nn.Module:
    """A published model as configs/{model,teacher}/<family>.yaml describe it: the file
    ``weights`` read by ``wakd.zoo.load`` as ``zoo_family`` (OpenIBL: ``pca_params``, its
    separate PCA file)."""
    options = {"pca": model_cfg.pca_params} if model_cfg.get("pca_params") else {}
    return zoo.load(model_cfg.weights, family=model_cfg.zoo_family, **options)


def build_teacher_net(teacher_cfg: DictConfig) -> torch.nn.Module:
    """A frozen teacher as configs/teacher/<option>.yaml describes it: a wakd place network
    from ``teacher.ckpt``, or a published model from ``teacher.weights`` that sees images at
    its ``teacher.image_size`` (:class:`wakd.zoo.ZooTeacher`)."""
    if "zoo_family" not in teacher_cfg:
        # A wakd checkpoint names its own architecture (head included: a GeM teacher loads
        # with teacher=resnet18 teacher.ckpt=PATH); teacher.net describes foreign files.
        return build_net(stored_model_config(teacher_cfg, teacher_cfg.ckpt), teacher_cfg.ckpt)
    size = teacher_cfg.image_size
    return ZooTeacher(build_zoo_model(teacher_cfg), tuple(size) if size else None, teacher_cfg.resize)


def model_config_for(cfg: DictConfig, ckpt: str | None) -> DictConfig:
    """Prefer the architecture stored in a wakd checkpoint over the command line's ``model``."""
    return stored_model_config(cfg.model, ckpt)


def stored_model_config(model_cfg: DictConfig, ckpt: str | None) -> DictConfig:
    """The architecture a wakd checkpoint ``ckpt`` stores, else ``model_cfg`` (foreign files, no file)."""
    stored = checkpoint_model_config(ckpt) if ckpt and Path(ckpt).is_file() else None
    return OmegaConf.create(stored) if stored else model_cfg


