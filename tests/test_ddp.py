"""Multi-process code paths on the CPU: 2 gloo processes stand in for 2 GPUs.

A dataset whose size the world size does not divide must still be described image by
image exactly once (no DistributedSampler padding, no dropped tail), also when streamed to a
descriptor store, and a DDP training run must finish with finite losses and a checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, TINY_TRAIN
from torch import nn
from torch.utils.data import Dataset

from wakd.describe import extract_descriptors

WORLD = 2


class IndexImages(Dataset):
    """Item i: a 3x4x4 'image' whose pixels encode i; every third image is marked invalid."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image = torch.arange(48, dtype=torch.float32).reshape(3, 4, 4) / 48 + i
        return image, i, i % 3 != 2


class Describe(nn.Module):
    """Descriptor [mean + index, per-channel means]: row i of the result identifies image i."""

    descriptor_dim = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        index = images.flatten(1).min(dim=1).values  # = i, the offset of image i
        return torch.cat([index[:, None], images.mean(dim=(2, 3))], dim=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIZES = (7, 1)  # 7 = 4 + 3 per rank; 1 leaves rank 1 an empty shard


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for n in SIZES:
            result = extract_descriptors(
                Describe(), IndexImages(n), batch_size=2, num_workers=0, progress=False, optimize=False
            )
            stored = extract_descriptors(  # both ranks stream into one store
                Describe(), IndexImages(n), batch_size=2, num_workers=0, progress=False, optimize=False,
                store=Path(out_dir) / f"store-n{n}.npy",
            )
            np.savez(Path(out_dir) / f"n{n}-rank{rank}.npz", descriptors=result.descriptors, valid=result.valid,
                     stored=stored.descriptors, stored_valid=stored.valid)
    finally:
        dist.destroy_process_group()


def test_extract_descriptors_two_processes_equals_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)  # one spawn: slow
    for n in SIZES:
        single = extract_descriptors(
            Describe(), IndexImages(n), batch_size=2, num_workers=0, progress=False, optimize=False
        )
        assert single.descriptors.shape == (n, 4)
        for rank in range(WORLD):  # every rank ends up with the whole, ordered result
            shard = np.load(tmp_path / f"n{n}-rank{rank}.npz")
            assert shard["descriptors"].shape == (n, 4)
            # Every image exactly once, in dataset order (column 0 is the image's index).
            np.testing.assert_array_equal(shard["descriptors"][:, 0], np.arange(n, dtype=np.float16))
            np.testing.assert_array_equal(shard["descriptors"], single.descriptors)
            np.testing.assert_array_equal(shard["valid"], single.valid)
            np.testing.assert_array_equal(shard["valid"], [i % 3 != 2 for i in range(n)])
            np.testing.assert_array_equal(shard["stored"], single.descriptors)  # the store, seen by each rank
            np.testing.assert_array_equal(shard["stored_valid"], single.valid)
    # The ranks' shards were woven into one store and removed.
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [f"store-n{n}.npy" for n in sorted(SIZES)]
    assert not list(tmp_path.glob(".*"))


def test_ddp_sim_training_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`python train.py trainer=ddp_sim`: 2 CPU processes (gloo, ddp_spawn) train one round."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, str(REPO / "train.py"), "trainer=ddp_sim", *TINY_TRAIN, "teacher=none",
        f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr  # really 2 ranks
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    recall = [float(r["val/R@5"]) for r in rows if r.get("val/R@5")]
    assert recall and all(0.0 <= v <= 1.0 for v in recall)
