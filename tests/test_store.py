"""The descriptor store: extraction streamed to an fp16 .npy equals extraction in RAM, bit for bit,
and a store appears only complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wakd.data.images import TensorImageDataset
from wakd.describe import extract_descriptors
from wakd.store import interleave_shards, open_store, shard_path, write_store


class Describe(nn.Module):
    """A small fixed projection of the pixels: descriptors with full fp16 mantissas."""

    descriptor_dim = 12

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 5, self.descriptor_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, 4, 5] -> [B, 12]
        return self.proj(images.flatten(1))


class FailingImages(TensorImageDataset):
    """Raises on image ``fail_at``: extraction stops half-way."""

    def __init__(self, images: torch.Tensor, fail_at: int) -> None:
        super().__init__(images)
        self.fail_at = fail_at

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        if i == self.fail_at:
            raise OSError(f"image {i} unreadable")
        return super().__getitem__(i)


def _extract(images: torch.Tensor, store: Path | None = None):
    torch.manual_seed(0)
    dataset = images if isinstance(images, TensorImageDataset) else TensorImageDataset(images)
    return extract_descriptors(Describe(), dataset, batch_size=3, num_workers=0, progress=False,
                               optimize=False, store=store)


def test_store_equals_in_memory_extraction(tmp_path: Path) -> None:
    images = torch.rand(11, 3, 4, 5, generator=torch.Generator().manual_seed(1))  # 11: a short last batch
    in_ram = _extract(images)
    on_disk = _extract(images, tmp_path / "desc.npy")
    assert isinstance(on_disk.descriptors, np.memmap) and not on_disk.descriptors.flags.writeable
    assert on_disk.descriptors.dtype == np.float16 and on_disk.descriptors.shape == (11, 12)
    np.testing.assert_array_equal(on_disk.descriptors.view(np.uint16), in_ram.descriptors.view(np.uint16))
    np.testing.assert_array_equal(on_disk.valid, in_ram.valid)
    np.testing.assert_array_equal(np.load(tmp_path / "desc.npy"), in_ram.descriptors)  # a plain .npy
    assert [p.name for p in tmp_path.iterdir()] == ["desc.npy"]  # no temporary file left


def test_failed_extraction_leaves_no_store(tmp_path: Path) -> None:
    images = torch.rand(9, 3, 4, 5)
    target = tmp_path / "desc.npy"
    with pytest.raises(OSError, match="image 7 unreadable"):
        _extract(FailingImages(images, fail_at=7), target)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary file

    before = _extract(images, target).descriptors.copy()
    with pytest.raises(OSError):
        _extract(FailingImages(torch.rand(9, 3, 4, 5), fail_at=2), target)
    np.testing.assert_array_equal(open_store(target), before)  # the previous store is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["desc.npy"]


def test_incomplete_store_is_not_written(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="3 of 4 rows"), write_store(tmp_path / "s.npy", rows=4) as writer:
        writer.append(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="does not fit"), write_store(tmp_path / "s.npy", rows=4) as writer:
        writer.append(np.ones((2, 2), np.float32))
        writer.append(np.ones((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_ranks_shards_interleave_into_image_order(tmp_path: Path) -> None:
    """What extract_descriptors does under DDP after every rank wrote its strided shard."""
    total, world = 10, 3
    full = np.random.default_rng(0).standard_normal((total, 5)).astype(np.float16)  # [10, 5]
    target = tmp_path / "desc.npy"
    shards = [shard_path(target, r, world) for r in range(world)]
    for r, path in enumerate(shards):
        with write_store(path, rows=len(range(r, total, world))) as writer:
            for block in np.array_split(full[r::world], 2):  # in two appends
                writer.append(block)
    interleave_shards(shards, total, target, chunk=2)
    np.testing.assert_array_equal(open_store(target), full)
    with pytest.raises(ValueError, match="expected 3 of 9"):
        interleave_shards(shards, 9, tmp_path / "other.npy")


def test_open_store_names_a_bad_file(tmp_path: Path) -> None:
    np.save(tmp_path / "f32.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"f32\.npy: a descriptor store holds \[N, D\] float16"):
        open_store(tmp_path / "f32.npy")
    with pytest.raises(FileNotFoundError, match=r"missing\.npy not found"):
        open_store(tmp_path / "missing.npy")
