"""DataModule for place-classification pretraining on freshly rendered city views."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from wakd.data.datamodule import split_images
from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import build_transform, extraction_loader
from wakd.synth.synthcity import RenderedPlaces


class RenderedPlacesDataModule(L.LightningDataModule):
    """Endless rendered views of the synthetic city's training streets, labelled by place;
    validation on the city's val split (queries then database images)."""

    def __init__(
        self,
        root: str,
        image_size: Sequence[int] = (96, 128),
        cell_size: float = 10.0,
        batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        views: int = 1,
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.root = root
        self.image_size = tuple(image_size)
        self.cell_size, self.views = cell_size, views
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size
        self.places: RenderedPlaces | None = None
        self.val_split: PlaceSplit | None = None

    @property
    def num_classes(self) -> int:
        assert self.places is not None, "call setup() first"
        return self.places.num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.places is None:
            self.places = RenderedPlaces(
                self.root, split="train", size=self.image_size, cell_size=self.cell_size, seed=self.seed,
                views=self.views,
            )
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

    def val_dataloader(self) -> DataLoader:
        """Val queries then database images, items (uint8 image, index in the split's images, valid).

        Decoded in the main process: the val split is small, and the rendering workers
        (persistent) stay alive beside it.
        """
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return extraction_loader(self.val_images(), batch_size=self.eval_batch_size, num_workers=0, device=device)

    def val_images(self) -> Dataset:
        assert self.val_split is not None
        return split_images(self.val_split, build_transform(self.image_size, train=False))
