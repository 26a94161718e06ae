"""Recall@N validation through Lightning's validation loop, shared by the training modules."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from wakd.describe import Describer, in_image_order
from wakd.eval.retrieval import retrieve


class RecallValidation:
    """Validation Recall@N of ``self.net`` on ``trainer.datamodule.val_split``, logged as ``val/R@N``.

    Mixed into a LightningModule that has ``net`` and ``eval_ns``; its datamodule's
    ``val_dataloader`` yields the split's queries then database images as (uint8 image,
    index, valid). ``validation_step`` describes a batch the way extraction does
    (:class:`wakd.describe.Describer`: on the CPU the BatchNorm-folded ONNX Runtime copy,
    built once per validation from the first batch); ``on_validation_epoch_end`` gathers
    every rank's descriptors and keeps each image once (the distributed sampler pads the
    ranks with repeats), then ranks the database for every query.
    """

    net: nn.Module
    eval_ns: tuple[int, ...]

    def on_validation_epoch_start(self) -> None:
        self._val_describer: Describer | None = None
        self._val_running = contextlib.ExitStack()
        self._val_batches: list[tuple[Tensor, Tensor, Tensor]] = []

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        images, index, valid = batch  # [B, 3, H, W] uint8 (or 0-1 float), [B], [B]
        if self._val_describer is None:
            self._val_describer = Describer(self.net, images, self.device)
            self._val_running.enter_context(self._val_describer.running())
        self._val_batches.append((index, self._val_describer(images), valid))

    def on_validation_epoch_end(self) -> None:
        self._val_running.close()
        batches, self._val_batches = self._val_batches, []
        if self.trainer.sanity_checking or not batches:  # a sanity check sees a few batches only
            return
        index, descriptors, valid = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if self.trainer.world_size > 1:  # every rank's batches, padding included: [world * M, ...]
            index, descriptors, valid = (self.all_gather(x).flatten(0, 1) for x in (index, descriptors, valid))
        split = self.trainer.datamodule.val_split
        descriptors, valid = in_image_order(index, descriptors, valid, split.num_queries + split.num_db)
        q_desc, db_desc = descriptors[: split.num_queries], descriptors[split.num_queries :]
        recall, _, _ = retrieve(q_desc, db_desc, split, self.eval_ns, db_valid=valid[split.num_queries :])
        for n, r in recall.items():
            # Every rank computed the same value from the same gathered descriptors.
            self.log(f"val/R@{n}", float(r), prog_bar=n in (1, 5), sync_dist=False)
