"""Runs of several processes started by an external launcher (torchrun, SLURM's srun, submitit).

Training: Lightning reads the launcher's environment when it builds the process group
(``TorchElasticEnvironment``, ``SLURMEnvironment``: global rank, world size, ``LOCAL_RANK``
for the device); this module covers the steps before it: how many processes the launcher
started, and whether they will all write into one run directory. Evaluation runs outside
Lightning and gets its process group from :func:`launcher_process_group`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist
from hydra.types import RunMode
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from omegaconf import DictConfig, OmegaConf


def external_launcher() -> tuple[str, int] | None:
    """(launcher, processes) when torchrun or a bare srun started this process among
    others; None for a single process, Lightning's own launchers and submitit, whose
    tasks share the submitting process's resolved config (timestamps included)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher, processes = "torchrun", os.environ.get("WORLD_SIZE", "1")
    elif "SLURM_STEP_NUM_TASKS" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ:
        launcher, processes = "srun", os.environ["SLURM_STEP_NUM_TASKS"]
    else:
        return None
    return (launcher, int(processes)) if int(processes) > 1 else None


def check_shared_run_dir(hydra_cfg: DictConfig) -> None:
    """Fail when the processes of an external launcher would each pick their own run
    directory: every process composes the config and resolves ``${now:...}`` from its own
    clock (another second, or another machine's clock), so checkpoints, logs and
    ``config.yaml`` would scatter over several directories."""
    launched = external_launcher()
    if launched is None:
        return
    launcher, processes = launched
    section = "sweep" if hydra_cfg.mode == RunMode.MULTIRUN else "run"
    key = f"{section}.dir"
    raw = str(OmegaConf.to_container(hydra_cfg[section], resolve=False)["dir"])
    if "${now:" in raw:
        raise ValueError(
            f"{launcher} started {processes} processes and each would name its own run directory "
            f"from its clock (hydra.{key}={raw}): pass hydra.{key}=DIR, the same on every node"
        )


def _launcher_environment() -> ClusterEnvironment | None:
    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect():
            return environment()
    return None


@contextlib.contextmanager
def launcher_process_group() -> Iterator[int]:
    """A gloo process group over the processes torchrun or SLURM (srun, submitit) started, for
    a job outside Lightning (eval.py): yields this process's global rank, 0 when it runs alone.
    gloo, since evaluation describes on the CPU; Lightning's environment classes read the
    launchers' variables, so ranks and the main node are found as in training."""
    environment = _launcher_environment()
    if environment is None or environment.world_size() == 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    # env:// reads these; under SLURM Lightning derives them from the job (node list, job id).
    os.environ.setdefault("MASTER_ADDR", environment.main_address)
    os.environ.setdefault("MASTER_PORT", str(environment.main_port))
    dist.init_process_group(
        "gloo", init_method="env://", rank=environment.global_rank(), world_size=environment.world_size()
    )
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()
