"""Descriptor extraction shared by mining, validation and evaluation.

Under DDP each rank extracts a strided shard (no padding: shard sizes differ by at most
one) and the shards are gathered, so every image is described exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from wakd.data.images import to_float, uint8_images
from wakd.models.inference import OnnxDescriptorNet, optimize_for_inference
from wakd.models.modes import evaluating

log = logging.getLogger(__name__)


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

    Images are 0-1 pixels: ``net`` normalises them itself. Images of ``ImageListDataset``s
    (also inside ``Subset`` / ``ConcatDataset``) are decoded to uint8 and converted to
    float here, batched, on ``device`` (into one reused buffer on the CPU): the same
    tensors, with a quarter of a worker's float work and inter-process traffic. On the
    CPU the forward already uses ``torch.get_num_threads()`` cores, so at most one worker
    per free core runs (``cpu_workers``): a worker on a busy core only steals cycles
    from the forward, and decoding inline is cheaper. With ONNX
    Runtime (its own threads) the few PyTorch operations of the loop (collation,
    float conversion, fp16) run single-threaded: on busy cores OpenMP's barriers made them
    slower than the forward itself on small images (bench/p2_extraction.py).
    """
    rank, world = _world()
    total = len(dataset)  # type: ignore[arg-type]
    device = torch.device(device)
    raw = uint8_images(dataset)
    shard = Subset(raw if raw is not None else dataset, list(range(rank, total, world)))
    if device.type == "cpu":
        num_workers = cpu_workers(num_workers)
    if optimize and device.type == "cpu" and len(shard):
        example = shard[0][0][None]
        net = optimize_for_inference(net, to_float(example) if raw is not None else example)
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    chunks: list[torch.Tensor] = []
    valid_chunks: list[torch.Tensor] = []
    buffer: torch.Tensor | None = None  # float batches on the CPU, reused
    own_threads = isinstance(net, OnnxDescriptorNet)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, unit="batch")
    with evaluating(net), torch_threads(1) if own_threads else contextlib.nullcontext():
        for batch, _, valid in bar:
            batch = batch.to(device, non_blocking=True)
            if raw is not None:
                out = None
                if device.type == "cpu":
                    if buffer is None or buffer.shape[1:] != batch.shape[1:] or len(buffer) < len(batch):
                        buffer = torch.empty(batch.shape, dtype=torch.float32)
                    out = buffer[: len(batch)]
                batch = to_float(batch, out=out)
            chunks.append(net(batch).to(torch.float16))
            valid_chunks.append(valid.to(device))
    seconds = time.perf_counter() - start
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


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block, then restored."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_workers(num_workers: int) -> int:
    """DataLoader workers for extraction on the CPU: at most one per core the forward's
    ``torch.get_num_threads()`` threads leave free, so none on a 2-core machine with 2
    threads: decoding inline there reached 0.85 of the bare forward at 480x640 against
    0.69 with one worker and 0.68 with two (bench/p2_extraction.py; similar on 96x128)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = max(0, cores - torch.get_num_threads())
    if num_workers > limit:
        log.debug("extraction on the CPU: %d DataLoader workers instead of %d", limit, num_workers)
    return min(num_workers, limit)


def _descriptor_dim(net: nn.Module) -> int:
    dim = getattr(net, "descriptor_dim", None)
    if dim is None:
        raise ValueError("cannot infer descriptor size of an empty shard: net has no descriptor_dim")
    return int(dim)


def split_descriptors(extraction: Extraction, sizes: Sequence[int]) -> list[np.ndarray]:
    """Split one extraction of concatenated image lists back into its parts."""
    bounds = np.cumsum([0, *sizes])
    return [extraction.descriptors[a:b] for a, b in itertools.pairwise(bounds)]
