"""WAKD distillation: similarity-preserving Gram losses on VLADs and attention maps.

Both terms compare N x N similarity structures over the N images of a tuple
batch, so teacher and student never need matching channel or spatial sizes.
A Gram here follows the reference (and similarity-preserving KD): G = x x^T
with x the flattened per-image vectors, then each *row of G* L2-normalised.

Teacher inputs may be live outputs or cached ones: a VLAD as [N, K, D] or
already intra-normalised and flattened [N, K*D] (or any global descriptor [N, D]:
the Gram needs no particular dimension); attention either as feature maps
[N, C, H, W] or precomputed maps [N, H*W] from :func:`attention_map`, or a
published teacher's map on another grid brought to the student's by :func:`resized_map`.
:func:`teacher_targets` turns a teacher's outputs into the precomputed form; the
training step uses it for the live teacher and the teacher cache stores its
output (in fp16), so both paths feed ``distill_loss`` the same targets.
Teacher inputs are treated as fixed targets (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_gram_loss",
    "attention_map",
    "distill_loss",
    "intra_normalised_vlad",
    "resized_map",
    "row_normalised_gram",
    "teacher_targets",
    "vlad_gram_loss",
]


def row_normalised_gram(x: Tensor, center: bool = False) -> Tensor:
    """x [N, ...] -> G [N, N]: G = x x^T on flattened rows, then each row of G L2-normalised.

    ``center`` subtracts the batch mean of the rows first. Where all descriptors share a
    large common part (the synthetic city's teacher: VLAD cosine 0.999 between any two
    images), the uncentred G is nearly constant, and matching it teaches the student to
    make every image alike; centring keeps only how the images differ.
    """
    flat = x.flatten(1)  # [N, L]
    if center:
        flat = flat - flat.mean(dim=0, keepdim=True)
    return F.normalize(flat @ flat.T, p=2, dim=1)


def intra_normalised_vlad(vlad: Tensor) -> Tensor:
    """[N, K, D] unnormalised or intra-normalised VLAD -> [N, K*D] intra-normalised, no global L2.

    A 2-D input is taken as already intra-normalised and flattened (e.g. from a cache).
    """
    if vlad.dim() == 2:
        return vlad
    if vlad.dim() != 3:
        raise ValueError(f"expected a VLAD [N, K, D] or [N, K*D], got shape {tuple(vlad.shape)}")
    return F.normalize(vlad, p=2, dim=2).flatten(1)


def vlad_gram_loss(student_vlad: Tensor, teacher_vlad: Tensor, center: bool = False) -> Tensor:
    """MSE(G_student, G_teacher) on intra-normalised VLADs; K and D may differ."""
    g_student = row_normalised_gram(intra_normalised_vlad(student_vlad), center)
    g_teacher = row_normalised_gram(intra_normalised_vlad(teacher_vlad.detach()), center)
    return F.mse_loss(g_student, g_teacher)


def attention_map(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Closed-form Grad-CAM of the channel-pooling "classifier", [N, C, H, W] -> [N, H*W].

    A = ReLU(F), p = softmax_k(mean_hw A_k), c = argmax p. The Grad-CAM of p_c
    (or log p_c) w.r.t. A has channel weights proportional to (delta_ck - p_k),
    so cam = ReLU(A_c - sum_k p_k A_k) up to a positive factor that the
    max-normalisation removes. p is detached, as the reference takes the
    gradient of a detached copy: the student learns through A only.
    Maps whose max is below ``eps`` (e.g. all-zero) stay near zero instead of NaN.
    """
    # at least float32, so that eps neither underflows nor dominates under mixed precision
    a = F.relu(features.to(torch.promote_types(features.dtype, torch.float32)))  # [N, C, H, W]
    p = F.softmax(a.mean(dim=(2, 3)), dim=1).detach()  # [N, C]
    c = p.argmax(dim=1)  # [N]
    a_c = a[torch.arange(a.shape[0], device=a.device), c]  # [N, H, W]
    cam = F.relu(a_c - torch.einsum("nc,nchw->nhw", p, a)).flatten(1)  # [N, H*W]
    return cam / cam.amax(dim=1, keepdim=True).clamp_min(eps)


def resized_map(maps: Tensor, size: tuple[int, int], eps: float = 1e-8) -> Tensor:
    """Teacher maps [N, h_t, w_t] >= 0 -> [N, h*w] on the student's h x w grid.

    Bilinear (``align_corners=False``: the two grids cover the same image, cell centres
    mapped proportionally), then each map divided by its maximum again, as
    :func:`attention_map`'s are: the Gram's rows weigh every image's map alike.
    """
    resized = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    flat = resized.flatten(1)  # [N, h*w]
    return flat / flat.amax(dim=1, keepdim=True).clamp_min(eps)


def _as_attention(x: Tensor) -> Tensor:
    """Feature maps [N, C, H, W] -> attention maps; precomputed maps [N, H*W] pass through."""
    if x.dim() == 4:
        return attention_map(x)
    if x.dim() == 2:
        return x
    raise ValueError(f"expected features [N, C, H, W] or attention [N, H*W], got {tuple(x.shape)}")


@torch.no_grad()
def teacher_targets(vlad: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Everything the distillation needs from the teacher, per image.

    vlad [N, K, D], features [N, C, h, w] -> (intra-normalised VLAD [N, K*D], attention
    map [N, h*w]); both in [-1, 1] (the maps in [0, 1]), so fp16 storage loses ~1e-3.
    """
    return intra_normalised_vlad(vlad), attention_map(features)


def attention_gram_loss(student_features: Tensor, teacher_features: Tensor, center: bool = False) -> Tensor:
    """MSE of row-normalised Grams of attention maps; each side features or precomputed maps."""
    g_student = row_normalised_gram(_as_attention(student_features), center)
    g_teacher = row_normalised_gram(_as_attention(teacher_features.detach()), center)
    return F.mse_loss(g_student, g_teacher)


def distill_loss(
    student_vlad: Tensor | None,
    teacher_vlad: Tensor | None,
    student_att_or_features: Tensor | None,
    teacher_att_or_features: Tensor | None,
    use_vlad: bool = True,
    use_attention: bool = True,
    center: bool = False,
) -> dict[str, Tensor]:
    """Enabled distillation terms and their unweighted sum.

    Returns {'vlad': ..., 'attention': ..., 'total': ...}, with only the enabled
    terms present; inputs of a disabled term are ignored (may be None). The
    caller applies the distillation weight (100 in the paper). ``center``: Grams of
    batch-centred rows (see ``row_normalised_gram``; the reference does not centre).
    """
    if not (use_vlad or use_attention):
        raise ValueError("distill_loss needs use_vlad or use_attention")
    terms: dict[str, Tensor] = {}
    if use_vlad:
        if student_vlad is None or teacher_vlad is None:
            raise ValueError("use_vlad=True needs student_vlad and teacher_vlad")
        terms["vlad"] = vlad_gram_loss(student_vlad, teacher_vlad, center)
    if use_attention:
        if student_att_or_features is None or teacher_att_or_features is None:
            raise ValueError("use_attention=True needs student and teacher attention inputs")
        terms["attention"] = attention_gram_loss(student_att_or_features, teacher_att_or_features, center)
    terms["total"] = torch.stack(list(terms.values())).sum()
    return terms
