"""One LightningModule for the plain NetVLAD baseline and for WAKD.

Without a teacher it trains a NetVLAD model with the hard loss (this is also how a
teacher is trained). With a teacher it adds the similarity-preserving distillation
L = L_hard + w_soft * L_soft + w_distill * (MSE_vlad + MSE_att) (docs/method.md, "Losses").
The frozen teacher and the previous generation's model are deliberately *not*
registered submodules: DDP never wraps them, the optimizer never sees them and the
student's checkpoint stores only the student (plus the teacher's path and hash).
With ``teacher_cache=True`` the teacher's targets of all training images are computed
once at fit start (:mod:`wakd.modules.teacher_cache`) and looked up by image id.
The teacher is a wakd PlaceNet (the reference: VLAD Grams, attention maps compared as they
are) or a published model (:class:`wakd.zoo.ZooTeacher`: descriptor Grams, its map resized
to the student's grid first); docs/method.md, section 5.

A Lightning epoch is one mining round; :class:`wakd.modules.mining_rounds.TupleMining` mines it
(the module brings that callback along) and the datamodule serves its tuples. Validation
runs in Lightning's loop (:class:`wakd.modules.validation.RecallValidation`), every
``trainer.check_val_every_n_epoch`` rounds. Built from ``configs/module/place.yaml``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from wakd.eval.protocol import training_card
from wakd.losses import distill_loss, hard_loss, hardest_regions, resized_map, sfrs_soft_loss
from wakd.models.modes import frozen
from wakd.models.place_net import PlaceNet
from wakd.modules.mining_rounds import TupleMining
from wakd.modules.settings import (
    DistillSettings,
    GenerationSchedule,
    LossSettings,
    OptimizerFactory,
    SchedulerFactory,
)
from wakd.modules.teacher_cache import TeacherCache, build_teacher_cache, teacher_targets_of
from wakd.modules.validation import RecallValidation
from wakd.zoo import ZooTeacher


def reference_gram_rows(neg_num: int, pos_num: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows of one tuple [anchor, positive, N negatives, P soft positives] that the
    distillation Grams cover: the reference's hard tuple (anchor, positive, negatives)
    followed by its soft tuple (anchor, soft positives), so the anchor counts twice:
    (2 + N) + (1 + P) rows, 9 for the paper's N = P = 3."""
    hard = torch.arange(2 + neg_num)
    soft = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(2 + neg_num, 2 + neg_num + pos_num)])
    return torch.cat([hard, soft]).to(device)


class PlaceModule(RecallValidation, L.LightningModule):
    """NetVLAD training with the hard loss, SFRS generations and, with a ``teacher``, WAKD.

    ``loss``, ``distill``, ``schedule``: the fields of :class:`LossSettings`,
    :class:`DistillSettings` and :class:`GenerationSchedule` (``generations``,
    ``first_passes``, ``passes``, in passes over the training queries of ``rounds_per_pass``
    rounds). ``teacher_info`` (name, path, hash) and ``model_config`` (the architecture
    eval.py rebuilds) go into every checkpoint.
    """

    def __init__(
        self,
        net: PlaceNet,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        *,
        loss: dict | None = None,
        distill: dict | None = None,
        schedule: dict | None = None,
        freeze_batchnorm: bool = False,
        eval_ns: Sequence[int] = (1, 5, 10),
        teacher: PlaceNet | ZooTeacher | None = None,
        teacher_info: dict | None = None,
        teacher_cache: bool = False,
        pos_num: int = 3,
        rounds_per_pass: int = 1,
        model_config: dict | None = None,
    ) -> None:
        super().__init__()
        # The settings, not the objects: checkpoints load with weights_only=True, which
        # refuses pickled modules and partials (the composed config.yaml records those).
        self.save_hyperparameters(ignore=["net", "teacher", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss = LossSettings(**(loss or {}))
        self.distill = DistillSettings(**(distill or {}))
        if self.distill.mine_with == "teacher" and teacher is None:
            raise ValueError("module.distill.mine_with='teacher': choose 'student', or 'teacher' with a teacher")
        self.schedule = GenerationSchedule(**(schedule or {}), rounds_per_pass=rounds_per_pass)
        self.use_teacher_cache = teacher_cache and teacher is not None
        self.teacher_cache: TeacherCache | None = None  # filled at fit start, never checkpointed
        self.pos_num = pos_num
        self.eval_ns = tuple(eval_ns)
        self.freeze_batchnorm = freeze_batchnorm
        self.model_config = model_config or {}
        self.teacher_info = teacher_info or {}
        # Unregistered on purpose (see module docstring): kept in __dict__, moved by hand.
        object.__setattr__(self, "teacher", frozen(teacher) if teacher is not None else None)
        object.__setattr__(self, "prev_net", None)
        self.generation = 0
        self.initial_state: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- set-up
    def train(self, mode: bool = True) -> PlaceModule:
        super().train(mode)
        for net in (self.teacher, self.prev_net):
            if net is not None:
                net.eval()  # Lightning's model.train() must not wake BatchNorm of frozen nets
        if mode:
            self._freeze_batchnorm()
        return self

    def _freeze_batchnorm(self) -> None:
        if self.freeze_batchnorm:
            # Tuples of look-alike views are unlike the images the statistics came from.
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def configure_callbacks(self) -> list[L.Callback]:
        return [TupleMining()]

    def on_train_epoch_start(self) -> None:
        self.start_round(self.current_epoch)
        # Lightning does not call train() when fitting starts; it keeps submodule modes.
        self._freeze_batchnorm()

    def on_fit_start(self) -> None:
        for net in (self.teacher, self.prev_net):
            if net is not None:
                net.to(self.device)
        if self.use_teacher_cache and self.distill.weight > 0:
            self.fill_teacher_cache()
        if self.initial_state is None and self.schedule.generations > 1:
            # Every generation restarts from the weights training started with.
            self.initial_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.logger is not None:
            trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
            stats = {
                "params/student": sum(p.numel() for p in self.net.parameters()),
                "params/student_trainable": trainable,
                "descriptor_dim": self.net.descriptor_dim,
            }
            if self.teacher is not None:
                stats["params/teacher"] = sum(p.numel() for p in self.teacher.parameters())
            self.logger.log_hyperparams(stats)

    def fill_teacher_cache(self) -> None:
        """Teacher targets of every training image (queries, then database), once per fit."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "train_images"):
            raise ValueError("teacher.cache=true needs a datamodule with train_images() (TupleDataModule)")
        cache = build_teacher_cache(
            self.teacher,
            datamodule.train_images(),
            datamodule.image_size,
            batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            device=self.device,
        )
        self.teacher_cache = cache
        rank_zero_info(
            f"teacher cache: {len(cache)} images x {cache.table.shape[1]} fp16 values "
            f"({cache.table.shape[1] * 2 / 1024:.1f} KiB per image, {cache.nbytes / 2**20:.1f} MiB)"
        )

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        # The paper steps StepLR per epoch = per pass over the queries, i.e. every rounds_per_pass rounds.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": self.schedule.rounds_per_pass},
        }

    # ------------------------------------------------------------ generations
    def start_round(self, round_index: int) -> None:
        """Enter a new generation if round ``round_index`` starts one: the trained network
        becomes the (frozen) previous generation, the student restarts from its initial
        weights with a new optimizer."""
        generation = self.schedule.generation_of(round_index)
        if generation == self.generation:
            return
        object.__setattr__(self, "prev_net", frozen(copy.deepcopy(self.net)))
        if self.initial_state is not None:
            self.net.load_state_dict(self.initial_state)
        self._reset_optimizers()
        self.generation = generation

    def mining_net(self, round_index: int) -> nn.Module:
        """The network that mines round ``round_index`` before it starts: the teacher with
        ``mine_with='teacher'``; else the student as it is, or at the start of a new
        generation its initial weights."""
        if self.distill.mine_with == "teacher":
            return self.teacher.to(self.device)  # mining may come before on_fit_start moved it
        if self.schedule.generation_of(round_index) == self.generation or self.initial_state is None:
            return self.net
        net = copy.deepcopy(self.net)
        net.load_state_dict(self.initial_state)
        return net

    def _reset_optimizers(self) -> None:
        """A new optimizer per generation: clear momentum and restore the initial learning rate."""
        if self._trainer is None:
            return
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.last_epoch = 0

    # --------------------------------------------------------------- training
    def distill_targets(
        self, images: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's Gram rows [N, L] and map [N, h_t, w_t] (or None) of flat images [N, 3, H, W].

        From the cache when it is filled (rows ``image_ids``), else from the live teacher:
        both through :func:`wakd.modules.teacher_cache.teacher_targets_of`, so they differ by
        fp16 rounding only.
        """
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(image_ids, self.device)
        return teacher_targets_of(self.teacher, images)

    def attention_targets(self, teacher_map: torch.Tensor | None, student_grid: tuple[int, int]) -> torch.Tensor:
        """The teacher's maps [N, h_t, w_t] as the attention Gram compares them, [N, L_att]: a wakd
        teacher's as they are (the reference's), a published teacher's resized to the student's grid."""
        if teacher_map is None:
            name = self.teacher_info.get("name", type(self.teacher).__name__)
            raise ValueError(
                f"teacher={name} gives no spatial map, so there is no attention term to distil: "
                "set module.distill.attention=false (the descriptor Gram alone)"
            )
        if isinstance(self.teacher, ZooTeacher):
            return resized_map(teacher_map, student_grid)
        return teacher_map.flatten(1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # images [B, T, 3, H, W], T = 2 + N + P: anchor, hard-loss positive, N negatives, P
        # soft-loss positives (TupleDataset); image_ids [B, T] global ids of the training
        # images (queries, then database: the order of the teacher cache)
        images, image_ids = batch
        b, t = images.shape[:2]
        p = self.pos_num
        n = t - 2 - p
        flat = images.flatten(0, 1)
        use_regions = self.generation >= 1
        out = self.net.encode(flat, regions=use_regions)
        desc = out.descriptor.view(b, t, -1)  # [B, T, K*D]
        anchor, positive, negatives = desc[:, 0], desc[:, 1], desc[:, 2 : 2 + n]
        if use_regions:
            regions = out.regions.view(b, t, *out.regions.shape[1:])  # [B, T, R, K*D]
            negatives = hardest_regions(anchor, regions[:, 2 : 2 + n])
        kw = {"margin": self.loss.margin} if self.loss.hard == "triplet" else {"tau": self.loss.tau}
        loss_hard = hard_loss(self.loss.hard, anchor, positive, negatives, **kw)
        loss = loss_hard
        self.log("train/loss_hard", loss_hard, prog_bar=True, batch_size=b)

        if use_regions and self.loss.soft_weight > 0 and self.prev_net is not None:
            soft_images = torch.cat([images[:, :1], images[:, 2 + n :]], dim=1)  # [B, 1 + P, ...]
            with torch.no_grad():
                prev = self.prev_net.encode(soft_images.flatten(0, 1), regions=True)
            prev_regions = prev.regions.view(b, 1 + p, *prev.regions.shape[1:])
            loss_soft = sfrs_soft_loss(
                anchor,
                regions[:, 2 + n :],
                prev.descriptor.view(b, 1 + p, -1)[:, 0],
                prev_regions[:, 1:],
                tau_prev=self.loss.tau_per_generation[min(self.generation, len(self.loss.tau_per_generation) - 1)],
                tau=self.loss.tau,
            )
            loss = loss + self.loss.soft_weight * loss_soft
            self.log("train/loss_soft", loss_soft, batch_size=b)

        if self.teacher is not None and self.distill.weight > 0:
            if self.teacher_cache is not None and tuple(image_ids.shape) != (b, t):
                raise ValueError(f"the teacher cache needs image ids [B, T] = [{b}, {t}], got {tuple(image_ids.shape)}")
            target_rows, target_map = self.distill_targets(flat, image_ids)
            # The similarity Gram's rows: the VLAD where the student has NetVLAD (the reference's), else its descriptor.
            student_rows = out.vlad if out.vlad is not None else out.descriptor
            target_attention = (
                self.attention_targets(target_map, tuple(out.features.shape[-2:])) if self.distill.attention else None
            )
            if self.distill.scope == "tuple":  # one Gram per tuple, over the reference's rows
                rows = reference_gram_rows(n, p, device=flat.device)
                groups = [i * t + rows for i in range(b)]
            else:  # one Gram over every image of the step, relating different places too
                groups = [torch.arange(b * t, device=flat.device)]
            terms = [
                distill_loss(
                    student_rows[group],
                    target_rows[group],
                    out.features[group],
                    target_attention[group] if target_attention is not None else None,
                    use_vlad=self.distill.vlad,
                    use_attention=self.distill.attention,
                    center=self.distill.center,
                )
                for group in groups
            ]
            loss_distill = torch.stack([term["total"] for term in terms]).mean()
            loss = loss + self.distill.weight * loss_distill
            self.log("train/loss_distill", loss_distill, prog_bar=True, batch_size=b)

        self.log("train/loss", loss, batch_size=b)
        self.log("train/generation", float(self.generation), batch_size=b)
        return loss

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["wakd"] = {
            "model": self.model_config,
            "generation": self.generation,
            "teacher": self.teacher_info,
            "prev_net": self.prev_net.state_dict() if self.prev_net is not None else None,
            "initial_state": self.initial_state,
            # The validation protocol that selects checkpoints and the weights saved (wakd.eval.protocol).
            "card": training_card(self.trainer, self.net, self.model_config.get("name")),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("wakd", {})
        self.generation = int(state.get("generation", 0))
        self.initial_state = state.get("initial_state")
        if state.get("prev_net") is not None:
            prev = copy.deepcopy(self.net)
            prev.load_state_dict(state["prev_net"])
            object.__setattr__(self, "prev_net", frozen(prev))

