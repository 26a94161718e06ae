"""Place pretraining on freshly rendered views: a stand-in for ImageNet weights.

The training streets are cut into cells; a place (label) is one cell seen in one
database heading. Every batch is freshly rendered views of those places, so the
backbone sees unlimited correctly labelled data. backbone -> GeM -> FC -> L2, then
one of two objectives:
- ``contrastive`` (default): two views per place, symmetric InfoNCE over the batch
  (other views of the same place count as positives). The calibration in
  bench/RESULTS.md found it learns far faster from scratch than classification;
- ``cosface``: a cosine classifier with a large margin (CosPlace):
  logits = s * (cos(theta_y) - m) for the true place, s * cos(theta_j) otherwise.
GeM, the embedding and the classifier are in :mod:`wakd.synth.embedding`, the two
objectives in :mod:`wakd.synth.embedding_losses`.
The backbone is stored as ``net.backbone.*`` so ``model.weights=<this .ckpt>`` loads it,
its input normalisation (``net.backbone.normalize.*``, applied by the backbone itself to
the rendered 0-1 views) included: the NetVLAD model then sees pixels on the same scale.

With a frozen ``teacher`` (a trained PlaceNet), the WAKD distillation terms join the
objective: the row-normalised Gram of the student's embeddings over the whole batch of
views must match the Gram of the teacher's VLADs (a GeM teacher's descriptors), and likewise for the attention maps
(:func:`wakd.losses.distill_loss`, the same losses as NetVLAD training). A batch of 64
views gives a 64 x 64 similarity structure to copy instead of a tuple's 7 x 7.

Built from ``configs/module/pretrain.yaml``: Adam (``configs/optimizer``) at
``optimizer.lr``, the learning rate stepped per optimizer step by ``configs/scheduler/warmup``.
Validation (Recall@N of the GeM embedding on the city's val split) runs in Lightning's
loop at the end of every epoch of ``trainer.limit_train_batches`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from wakd.eval.protocol import training_card
from wakd.losses import distill_loss
from wakd.models.modes import frozen
from wakd.models.place_net import PlaceNet
from wakd.modules.settings import DistillSettings, OptimizerFactory, SchedulerFactory
from wakd.modules.teacher_cache import teacher_targets_of
from wakd.modules.validation import RecallValidation
from wakd.synth.embedding import CosineClassifier, PlaceEmbedding
from wakd.synth.embedding_losses import cosface_logits, multi_positive_info_nce

# Rendered views of a place per sample each objective trains on.
VIEWS_PER_OBJECTIVE = {"contrastive": 2, "cosface": 1}


class PlacePretrainModule(RecallValidation, L.LightningModule):
    """Pretrains the backbone of ``net`` (a place network as ``model.*`` builds it; its
    NetVLAD is not used: the NetVLAD stage clusters its own) through a GeM embedding.

    ``num_classes``: places of the rendered city (the datamodule's), for ``cosface``;
    ``head_lr``: the classifier's learning rate; ``scale``, ``margin``: CosFace's s and m;
    ``temperature``: InfoNCE's; ``distill``: the weight, vlad, attention and center fields of
    :class:`wakd.modules.settings.DistillSettings`.
    """

    def __init__(
        self,
        net: PlaceNet,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        *,
        num_classes: int,
        objective: str = "contrastive",
        temperature: float = 0.1,
        embed_dim: int = 256,
        scale: float = 30.0,
        margin: float = 0.25,
        head_lr: float = 1e-2,
        teacher: PlaceNet | None = None,
        distill: dict | None = None,
        eval_ns: Sequence[int] = (1, 5, 10),
    ) -> None:
        super().__init__()
        if objective not in VIEWS_PER_OBJECTIVE:
            raise ValueError(f"module.objective={objective!r}: choose contrastive or cosface")
        if teacher is not None and objective != "contrastive":
            raise ValueError("distillation during pretraining (teacher=<arch>) needs module.objective=contrastive")
        # The settings, not the objects (see PlaceModule).
        self.save_hyperparameters(ignore=["net", "teacher", "optimizer", "scheduler"])
        self.objective, self.temperature = objective, temperature
        self.net = PlaceEmbedding(net.backbone, embed_dim)  # keys net.backbone.*
        self.head = CosineClassifier(embed_dim, num_classes) if objective == "cosface" else None
        self.scale, self.margin = scale, margin
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.head_lr = head_lr
        self.eval_ns = tuple(eval_ns)
        # Unregistered, as in PlaceModule: never trained, never in the checkpoint.
        object.__setattr__(self, "teacher", frozen(teacher) if teacher is not None else None)
        self.distill = DistillSettings(**(distill or {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["wakd"] = {"card": training_card(self.trainer, self.net, f"pretrain-{self.objective}")}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch  # [B, 3, H, W] (cosface) or [B, 2, 3, H, W] (contrastive), in [0, 1]
        if self.head is not None:  # the teacher, if any, is only used with the contrastive objective
            logits = cosface_logits(self.head(self.net(images)), labels, self.scale, self.margin)  # [B, C]
            loss = F.cross_entropy(logits, labels)
            self.log("train/accuracy", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        else:
            b = images.shape[0]
            flat = images.flatten(0, 1)  # [2B, 3, H, W]; student and teacher each normalise their own
            features = self.net.backbone(flat)
            embeddings = self.net.embed(features)  # [2B, E]
            pairs = embeddings.view(b, 2, -1)
            loss = multi_positive_info_nce(pairs[:, 0], pairs[:, 1], labels, self.temperature)
            if self.teacher is not None and self.distill.weight > 0:
                loss = loss + self.distill.weight * self._distill(flat, embeddings, features)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _distill(self, images: torch.Tensor, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # Intra-normalised VLAD rows (a GeM teacher: its descriptor), maps [N, h, w].
            teacher_rows, teacher_map = teacher_targets_of(self.teacher, images)
        terms = distill_loss(embeddings, teacher_rows, features, teacher_map.flatten(1),
                             use_vlad=self.distill.vlad, use_attention=self.distill.attention,
                             center=self.distill.center)
        self.log("train/loss_distill", terms["total"], prog_bar=True)
        return terms["total"]

    def train(self, mode: bool = True) -> PlacePretrainModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning's model.train() must not wake the teacher's BatchNorm
        return self

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad]}]
        if self.head is not None:  # a fresh classifier of thousands of places learns faster than the body
            groups.append({"params": list(self.head.parameters()), "lr": self.head_lr})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
