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
The backbone is stored as ``net.backbone.*`` so ``model.weights=<this .ckpt>`` loads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from wakd.data.images import IMAGENET_MEAN, IMAGENET_STD
from wakd.eval.evaluate import evaluate_split


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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.pool(self.backbone(images))), dim=-1)


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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch  # [B, 3, H, W] (cosface) or [B, 2, 3, H, W] (contrastive), in [0, 1]
        if self.head is not None:
            embeddings = self.net((images - self.mean) / self.std)
            logits = self.head(embeddings, labels)
            loss = F.cross_entropy(logits, labels)
            self.log("train/accuracy", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        else:
            b = images.shape[0]
            embeddings = self.net((images.flatten(0, 1) - self.mean) / self.std).view(b, 2, -1)
            loss = multi_positive_info_nce(embeddings[:, 0], embeddings[:, 1], labels, self.temperature)
        self.log("train/loss", loss, prog_bar=True)
        return loss

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
