"""Descriptor extraction shared by mining, validation and evaluation.

Under DDP each rank extracts a strided shard (no padding: shard sizes differ by at most
one) and the shards are gathered, so every image is described exactly once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from wakd.models.inference import optimize_for_inference


@dataclass
class Extraction:
    descriptors: np.ndarray  # [N, D] float16, row i describes image i
    valid: np.ndarray  # [N] bool, False for images skipped as corrupt
    images_per_second: float


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_shards(local: torch.Tensor, total: int, rank: int, world: int) -> torch.Tensor:
    """Reassemble strided shards (rank r holds rows r, r+world, ...) into [total, ...]."""
    if world == 1:
        return local
    size = (total + world - 1) // world
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = local.new_empty((total, *local.shape[1:]))
    for r, shard in enumerate(gathered):
        count = len(range(r, total, world))
        out[r::world] = shard[:count]  # drop the padding
    return out


@torch.no_grad()
def extract_descriptors(
    net: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    desc: str = "extract",
    progress: bool = True,
    optimize: bool = True,
) -> Extraction:
    """Describe every item of ``dataset`` (items are ``(image, index, valid)``) with ``net``.

    ``optimize``: on the CPU, describe with BatchNorm folded and ONNX Runtime (about 7x
    eager fp32 for the student, descriptors within 1e-4; bench/p1_speedup.py).
    """
    rank, world = _world()
    total = len(dataset)  # type: ignore[arg-type]
    shard = Subset(dataset, list(range(rank, total, world)))
    device = torch.device(device)
    if optimize and device.type == "cpu" and len(shard):
        net = optimize_for_inference(net, shard[0][0][None])
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    was_training = net.training
    net.eval()
    chunks: list[torch.Tensor] = []
    valid_chunks: list[torch.Tensor] = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, unit="batch")
    for images, _, valid in bar:
        out = net(images.to(device, non_blocking=True))
        chunks.append(out.to(torch.float16))
        valid_chunks.append(valid.to(device))
    seconds = time.perf_counter() - start
    net.train(was_training)
    if chunks:
        local = torch.cat(chunks)
        local_valid = torch.cat(valid_chunks)
    else:  # a rank with an empty shard still takes part in the gather
        dim = _descriptor_dim(net)
        local = torch.zeros((0, dim), dtype=torch.float16, device=device)
        local_valid = torch.zeros((0,), dtype=torch.bool, device=device)
    descriptors = _gather_shards(local, total, rank, world)
    valid_all = _gather_shards(local_valid, total, rank, world)
    return Extraction(
        descriptors=descriptors.cpu().numpy(),
        valid=valid_all.cpu().numpy().astype(bool),
        images_per_second=len(shard) * world / max(seconds, 1e-9),
    )


def _descriptor_dim(net: nn.Module) -> int:
    dim = getattr(net, "descriptor_dim", None)
    if dim is None:
        raise ValueError("cannot infer descriptor size of an empty shard: net has no descriptor_dim")
    return int(dim)


def split_descriptors(extraction: Extraction, sizes: Sequence[int]) -> list[np.ndarray]:
    """Split one extraction of concatenated image lists back into its parts."""
    bounds = np.cumsum([0, *sizes])
    return [extraction.descriptors[a:b] for a, b in itertools.pairwise(bounds)]
