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
The backbone is stored as ``net.backbone.*`` so ``model.weights=<this .ckpt>`` loads it,
its input normalisation (``net.backbone.normalize.*``, applied by the backbone itself to
the rendered 0-1 views) included: the NetVLAD model then sees pixels on the same scale.

With a frozen ``teacher`` (a trained PlaceNet), the WAKD distillation terms join the
objective: the row-normalised Gram of the student's embeddings over the whole batch of
views must match the Gram of the teacher's VLADs, and likewise for the attention maps
(:func:`wakd.losses.distill_loss`, the same losses as NetVLAD training). A batch of 64
views gives a 64 x 64 similarity structure to copy instead of a tuple's 7 x 7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from wakd.eval.evaluate import evaluate_split
from wakd.losses import distill_loss, teacher_targets
from wakd.models.place_net import PlaceNet


class GeM(nn.Module):
    """Generalised-mean pooling: (mean x^p)^(1/p), p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, C]
        return x.clamp_min(self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class PlaceEmbedding(nn.Module):
    """backbone -> GeM -> FC -> L2: a global descriptor, also used to validate pretraining."""

    def __init__(self, backbone: nn.Module, out_channels: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GeM()
        self.fc = nn.Linear(out_channels, embed_dim)

    @property
    def descriptor_dim(self) -> int:
        return self.fc.out_features

    def embed(self, features: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, E]
        return F.normalize(self.fc(self.pool(features)), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))


class CosineMarginHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.25) -> None:
        super().__init__()
        # Unit-scale rows: Adam moves each weight by ~lr per step, so tiny rows would be thrashed.
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim))
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = embeddings @ F.normalize(self.weight, dim=-1).T  # [B, C]
        margin = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype) * self.margin
        return self.scale * (cosine - margin)


def multi_positive_info_nce(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between views ``a`` and ``b`` ([B, E], L2-normalised) of places
    ``labels`` [B]; a row's target spreads evenly over all views of its place."""
    logits = a @ b.T / temperature  # [B, B]
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return -(target * (F.log_softmax(logits, 1) + F.log_softmax(logits.T, 1))).sum(1).mean() / 2


class PlacePretrainModule(L.LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        out_channels: int,
        num_classes: int,
        *,
        objective: str = "contrastive",
        temperature: float = 0.1,
        embed_dim: int = 256,
        scale: float = 30.0,
        margin: float = 0.25,
        lr: float = 1e-3,
        head_lr: float = 1e-2,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        teacher: PlaceNet | None = None,
        distill_weight: float = 100.0,
        distill_vlad: bool = True,
        distill_attention: bool = True,
        distill_center: bool = False,
        eval_ns: Sequence[int] = (1, 5, 10),
    ) -> None:
        super().__init__()
        if objective not in ("contrastive", "cosface"):
            raise ValueError(f"pretrain.objective={objective!r}: choose contrastive or cosface")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"pretrain.schedule={schedule!r}: choose constant or cosine")
        if schedule == "cosine" and not total_steps:
            raise ValueError("pretrain.schedule=cosine needs pretrain.steps > 0")
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.objective, self.temperature = objective, temperature
        self.net = PlaceEmbedding(backbone, out_channels, embed_dim)  # keys net.backbone.*
        self.head = CosineMarginHead(embed_dim, num_classes, scale, margin) if objective == "cosface" else None
        self.lr, self.head_lr = lr, head_lr
        self.eval_ns = tuple(eval_ns)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # Unregistered, as in PlaceModule: never trained, never in the checkpoint.
        object.__setattr__(self, "teacher", teacher)
        self.distill_weight, self.distill_vlad, self.distill_attention = distill_weight, distill_vlad, distill_attention
        self.distill_center = distill_center

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch  # [B, 3, H, W] (cosface) or [B, 2, 3, H, W] (contrastive), in [0, 1]
        if self.head is not None:  # the teacher, if any, is only used with the contrastive objective
            embeddings = self.net(images)
            logits = self.head(embeddings, labels)
            loss = F.cross_entropy(logits, labels)
            self.log("train/accuracy", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        else:
            b = images.shape[0]
            flat = images.flatten(0, 1)  # [2B, 3, H, W]; student and teacher each normalise their own
            features = self.net.backbone(flat)
            embeddings = self.net.embed(features)  # [2B, E]
            pairs = embeddings.view(b, 2, -1)
            loss = multi_positive_info_nce(pairs[:, 0], pairs[:, 1], labels, self.temperature)
            if self.teacher is not None and self.distill_weight > 0:
                loss = loss + self.distill_weight * self._distill(flat, embeddings, features)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _distill(self, images: torch.Tensor, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher.encode(images)
            teacher_vlad, teacher_attention = teacher_targets(target.vlad, target.features)
        terms = distill_loss(embeddings, teacher_vlad, features, teacher_attention,
                             use_vlad=self.distill_vlad, use_attention=self.distill_attention,
                             center=self.distill_center)
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

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rates at optimizer step ``step``: linear warm-up,
        then constant or a cosine decay to 0 at ``total_steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> dict:
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad], "lr": self.lr}]
        if self.head is not None:  # a fresh classifier of thousands of places learns faster than the body
            groups.append({"params": list(self.head.parameters()), "lr": self.head_lr})
        optimizer = torch.optim.Adam(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_end(self) -> None:
        """Recall@N of the GeM embedding on the validation split of the city."""
        datamodule = self.trainer.datamodule
        if datamodule is None or datamodule.val_split is None:
            return
        result = evaluate_split(
            self.net, datamodule.val_split, datamodule.val_images(), ns=self.eval_ns,
            batch_size=64, num_workers=0, device=self.device, progress=False,
        )
        for n, r in result.recall.items():
            self.log(f"val/R@{n}", float(r), prog_bar=n in (1, 5))
