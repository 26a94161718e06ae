"""DataModule for place-classification pretraining on freshly rendered city views."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from wakd.data.datamodule import split_images
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import build_transform
from wakd.data.synthcity import RenderedPlaces


class RenderedPlacesDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        image_size: Sequence[int] = (96, 128),
        cell_size: float = 10.0,
        batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        views: int = 1,
    ) -> None:
        super().__init__()
        self.root = root
        self.image_size = tuple(image_size)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.places = RenderedPlaces(root, split="train", size=self.image_size, cell_size=cell_size, seed=seed, views=views)
        self.val_split: PlaceSplit | None = None

    @property
    def num_classes(self) -> int:
        return self.places.num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.val_split is None:
            self.val_split = load_split("synthcity", self.root, "val")

    def train_dataloader(self) -> DataLoader:
        # Rendering is the bottleneck (~8 ms per view): keep workers busy ahead of the model.
        return DataLoader(
            self.places,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def val_images(self) -> Dataset:
        assert self.val_split is not None
        transform = build_transform(self.image_size, train=False)
        return split_images(self.val_split, transform)
