"""Losses as pure functions of tensors: hard (triplet / SARE), soft (SFRS), distillation."""

from wakd.losses.distill import (
    attention_gram_loss,
    attention_map,
    distill_loss,
    intra_normalised_vlad,
    resized_map,
    row_normalised_gram,
    teacher_targets,
    vlad_gram_loss,
)
from wakd.losses.hard import (
    HARD_LOSSES,
    hard_loss,
    hardest_regions,
    sare_ind_loss,
    sare_joint_loss,
    triplet_loss,
)
from wakd.losses.soft import TAU_PER_GENERATION, sfrs_soft_loss

__all__ = [
    "HARD_LOSSES",
    "TAU_PER_GENERATION",
    "attention_gram_loss",
    "attention_map",
    "distill_loss",
    "hard_loss",
    "hardest_regions",
    "intra_normalised_vlad",
    "resized_map",
    "row_normalised_gram",
    "sare_ind_loss",
    "sare_joint_loss",
    "sfrs_soft_loss",
    "teacher_targets",
    "triplet_loss",
    "vlad_gram_loss",
]
