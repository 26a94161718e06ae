"""Descriptor extraction: images in, one global descriptor per image out.

Used wherever a network describes many images: mining (``wakd.modules.mining_rounds``), the
teacher cache, validation, evaluation and benchmarks. On the CPU a network describes
through its optimised inference copy (BatchNorm folded, ONNX Runtime:
``wakd.models.inference``), from uint8 images converted to floats batched
(``wakd.data.images.extraction_loader``).

Under DDP :func:`extract_descriptors` has each rank describe a strided shard (no padding:
shard sizes differ by at most one) and gathers the shards, so every image is described
exactly once; Lightning's validation loop shards with a padding sampler instead, and
:func:`in_image_order` drops its repeats. With ``store=PATH`` the descriptors go to disk
as they come (``wakd.store``) instead of into RAM: each rank writes its shard to a file of
its own and rank 0 weaves them into PATH.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from wakd.data.images import extraction_loader, to_float
from wakd.models.inference import OnnxDescriptorNet, optimize_for_inference
from wakd.models.modes import evaluating
from wakd.store import interleave_shards, open_store, shard_path, write_store


@dataclass
class Extraction:
    descriptors: np.ndarray  # [N, D] float16, row i describes image i (a read-only np.memmap with a store)
    valid: np.ndarray  # [N] bool, False for images skipped as corrupt
    images_per_second: float


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


class Describer:
    """``net`` as extraction runs it: batches (uint8 or 0-1 float) -> fp16 descriptors.

    ``example``: one batch of the images to come (its first image is used). With
    ``optimize`` on the CPU, ``net`` is replaced by its inference copy (about 7x eager fp32
    for the student, descriptors within 1e-4; bench/p1_speedup.py); ``net`` itself is left
    as it is. uint8 batches are converted to floats on ``device``, on the CPU into one
    reused buffer. Use it inside :meth:`running`.
    """

    def __init__(self, net: nn.Module, example: Tensor, device: torch.device | str, optimize: bool = True) -> None:
        self.device = torch.device(device)
        if optimize and self.device.type == "cpu":
            first = example[:1]
            net = optimize_for_inference(net, to_float(first) if first.dtype == torch.uint8 else first)
        self.net = net
        self._buffer: Tensor | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Describer]:
        """``net`` in eval mode; with ONNX Runtime (its own threads) the few PyTorch
        operations per batch (collation, float conversion, fp16) run single-threaded: on
        busy cores OpenMP's barriers made them slower than the forward itself on small
        images (bench/p2_extraction.py)."""
        own_threads = isinstance(self.net, OnnxDescriptorNet)
        with evaluating(self.net), torch_threads(1) if own_threads else contextlib.nullcontext():
            yield self

    def __call__(self, images: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, D] float16
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            out = None
            if self.device.type == "cpu":
                buffer = self._buffer
                if buffer is None or buffer.shape[1:] != images.shape[1:] or len(buffer) < len(images):
                    buffer = self._buffer = torch.empty(images.shape, dtype=torch.float32)
                out = buffer[: len(images)]
            images = to_float(images, out=out)
        return self.net(images).to(torch.float16)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_shards(local: Tensor, total: int, rank: int, world: int) -> Tensor:
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
    store: str | os.PathLike | None = None,
) -> Extraction:
    """Describe every item of ``dataset`` (items are ``(image, index, valid)``) with ``net``.

    Images are 0-1 pixels: ``net`` normalises them itself (and projects, when it carries
    a PCA: batch by batch, so a store never sees the unprojected descriptors).
    ``optimize``: see :class:`Describer`; loading: :func:`wakd.data.images.extraction_loader`.
    ``store``: a ``.npy`` path; the descriptors are streamed there, batch by batch, and
    returned memory-mapped, so RAM never holds them all. Under DDP every rank writes its
    strided shard to ``wakd.store.shard_path(store, rank, world)``, rank 0 interleaves the
    shards into ``store`` in image order and deletes them, and every rank returns the
    same mapped file (``store`` must be on a file system all ranks see).
    """
    rank, world = _world()
    total = len(dataset)  # type: ignore[arg-type]
    device = torch.device(device)
    loader = extraction_loader(
        Subset(dataset, list(range(rank, total, world))), batch_size=batch_size, num_workers=num_workers, device=device
    )
    count = len(loader.dataset)  # type: ignore[arg-type]
    local: Tensor | None = None  # [count, D] fp16 without a store, allocated at the first batch
    local_valid = torch.zeros((count,), dtype=torch.bool, device=device)
    with contextlib.ExitStack() as stack:
        writer = None
        if store is not None:
            writer = stack.enter_context(write_store(store if world == 1 else shard_path(store, rank, world), count))
        start = time.perf_counter()
        if count:
            describer = Describer(net, loader.dataset[0][0][None], device, optimize=optimize)
            bar = tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, unit="batch")
            row = 0
            with describer.running():
                for images, _, valid in bar:
                    batch = describer(images)  # [B, D] float16
                    if writer is not None:
                        writer.append(batch.cpu().numpy())
                    else:
                        if local is None:
                            local = batch.new_empty((count, batch.shape[1]))
                        # Rows written in place: concatenating per-batch pieces at the end cost
                        # up to a fifth of the forward's time on 96x128 images (bench/p2_extraction.py).
                        local[row : row + len(batch)] = batch
                    local_valid[row : row + len(batch)] = valid.to(device)
                    row += len(batch)
        elif writer is not None:
            writer.dim = _descriptor_dim(net)  # an empty shard still has the store's width
        seconds = time.perf_counter() - start
    # The valid flags are small ([N] bool): gathered in RAM with or without a store.
    valid_all = _gather_shards(local_valid, total, rank, world).cpu().numpy().astype(bool)
    if store is not None:
        descriptors = _combine_store(Path(store), total, rank, world)
    else:
        if local is None:  # a rank with an empty shard still takes part in the gather
            local = torch.zeros((0, _descriptor_dim(net)), dtype=torch.float16, device=device)
        descriptors = _gather_shards(local, total, rank, world).cpu().numpy()
    return Extraction(
        descriptors=descriptors,
        valid=valid_all,
        images_per_second=count * world / max(seconds, 1e-9),
    )


def _combine_store(store: Path, total: int, rank: int, world: int) -> np.ndarray:
    """The finished store mapped read-only; under DDP rank 0 first weaves the ranks' shards into it."""
    if world > 1:
        dist.barrier()  # every shard is complete
        if rank == 0:
            shards = [shard_path(store, r, world) for r in range(world)]
            interleave_shards(shards, total, store)
            for shard in shards:
                shard.unlink()
        dist.barrier()  # the store is in place
    return open_store(store)


def _descriptor_dim(net: nn.Module) -> int:
    dim = getattr(net, "descriptor_dim", None)
    if dim is None:
        raise ValueError("cannot infer descriptor size of an empty shard: net has no descriptor_dim")
    return int(dim)


def in_image_order(index: Tensor, descriptors: Tensor, valid: Tensor, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows described in any order, some more than once, as (descriptors [total, D], valid [total]).

    ``index`` [M] says which image each row of ``descriptors`` [M, D] and ``valid`` [M]
    describes; a distributed sampler's padding repeats images, which are kept once. Every
    image 0 .. total-1 must be present.
    """
    images, first = np.unique(index.cpu().numpy(), return_index=True)  # the first copy of each image
    if len(images) != total or (total and (images[0] != 0 or images[-1] != total - 1)):
        raise ValueError(
            f"descriptors of {len(images)} of {total} images: Recall@N needs every one "
            "(is trainer.limit_val_batches below 1.0?)"
        )
    return descriptors.cpu().numpy()[first], valid.cpu().numpy().astype(bool)[first]


def split_descriptors(extraction: Extraction, sizes: Sequence[int]) -> list[np.ndarray]:
    """Split one extraction of concatenated image lists back into its parts."""
    bounds = np.cumsum([0, *sizes])
    return [extraction.descriptors[a:b] for a, b in itertools.pairwise(bounds)]
