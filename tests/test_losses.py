"""Losses against hand-computed values and plain loops on tiny examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wakd.losses import (
    HARD_LOSSES,
    TAU_PER_GENERATION,
    attention_gram_loss,
    attention_map,
    distill_loss,
    hard_loss,
    hardest_regions,
    intra_normalised_vlad,
    row_normalised_gram,
    sare_ind_loss,
    sare_joint_loss,
    sfrs_soft_loss,
    triplet_loss,
    vlad_gram_loss,
)

TAU = 0.07


def unit(deg: float) -> list[float]:
    """2-D unit vector at angle ``deg`` degrees."""
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def random_unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# Anchor at 0 deg, positive at 30 deg; negatives at 40 deg (hard) and 120 deg (easy).
ANGLES_P, ANGLES_N = 30.0, (40.0, 120.0)


@pytest.fixture
def tuple_2d() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    anchor = torch.tensor([unit(0)], dtype=torch.float64)  # [1, 2]
    positive = torch.tensor([unit(ANGLES_P)], dtype=torch.float64)  # [1, 2]
    negatives = torch.tensor([[unit(a) for a in ANGLES_N]], dtype=torch.float64)  # [1, 2, 2]
    return anchor, positive, negatives


# ---------------------------------------------------------------- hard losses


def test_triplet_matches_chord_lengths(tuple_2d) -> None:
    anchor, positive, negatives = tuple_2d
    margin = 0.1**0.5

    def chord(deg: float) -> float:  # |u(0) - u(deg)| for unit vectors
        return 2 * math.sin(math.radians(deg) / 2)

    expected = sum(max(0.0, chord(ANGLES_P) - chord(a) + margin) for a in ANGLES_N) / 2
    assert expected > 0  # the 40-degree negative violates the margin
    assert triplet_loss(anchor, positive, negatives).item() == pytest.approx(expected, abs=1e-12)
    assert triplet_loss(anchor, positive, negatives, margin=0.0).item() == 0.0


def test_triplet_agrees_with_torch_reference() -> None:
    a, p, n = random_unit(3, 8, seed=1), random_unit(3, 8, seed=2), random_unit(3, 4, 8, seed=3)
    ref = F.triplet_margin_loss(
        a.unsqueeze(1).expand_as(n).reshape(-1, 8),
        p.unsqueeze(1).expand_as(n).reshape(-1, 8),
        n.reshape(-1, 8),
        margin=0.3,
        eps=0.0,
    )
    assert triplet_loss(a, p, n, margin=0.3).item() == pytest.approx(ref.item(), abs=1e-12)


def test_sare_ind_hand_value(tuple_2d) -> None:
    anchor, positive, negatives = tuple_2d
    s_p = math.cos(math.radians(ANGLES_P))
    # -log(e^{s_p/t} / (e^{s_p/t} + e^{s_n/t})) = log(1 + e^{(s_n - s_p)/t}), averaged over negatives
    expected = sum(
        math.log1p(math.exp((math.cos(math.radians(a)) - s_p) / TAU)) for a in ANGLES_N
    ) / len(ANGLES_N)
    assert sare_ind_loss(anchor, positive, negatives).item() == pytest.approx(expected, rel=1e-12)


def test_sare_joint_hand_value(tuple_2d) -> None:
    anchor, positive, negatives = tuple_2d
    s_p = math.cos(math.radians(ANGLES_P))
    expected = math.log1p(sum(math.exp((math.cos(math.radians(a)) - s_p) / TAU) for a in ANGLES_N))
    assert sare_joint_loss(anchor, positive, negatives).item() == pytest.approx(expected, rel=1e-12)


def test_sare_losses_loop_over_batch() -> None:
    a, p, n = random_unit(3, 6, seed=4), random_unit(3, 6, seed=5), random_unit(3, 4, 6, seed=6)
    ind, joint = [], []
    for b in range(3):
        s_p = float(a[b] @ p[b])
        s_n = [float(a[b] @ n[b, j]) for j in range(4)]
        ind += [math.log1p(math.exp((s - s_p) / TAU)) for s in s_n]
        joint.append(math.log1p(sum(math.exp((s - s_p) / TAU) for s in s_n)))
    assert sare_ind_loss(a, p, n).item() == pytest.approx(sum(ind) / len(ind), rel=1e-10)
    assert sare_joint_loss(a, p, n).item() == pytest.approx(sum(joint) / len(joint), rel=1e-10)


def test_sare_ind_equals_joint_with_one_negative() -> None:
    a, p, n = random_unit(5, 16, seed=7), random_unit(5, 16, seed=8), random_unit(5, 1, 16, seed=9)
    torch.testing.assert_close(sare_ind_loss(a, p, n), sare_joint_loss(a, p, n))


@pytest.mark.parametrize("name", sorted(HARD_LOSSES))
def test_hard_losses_have_gradients(name: str) -> None:
    a, p, n = (
        t.requires_grad_()
        for t in (random_unit(2, 8), random_unit(2, 8, seed=1), random_unit(2, 3, 8, seed=2))
    )
    # a large margin keeps every triplet active
    kwargs = {"margin": 4.0} if name == "triplet" else {}
    hard_loss(name, a, p, n, **kwargs).backward()
    for t in (a, p, n):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_triplet_gradient_finite_when_anchor_equals_positive() -> None:
    a = random_unit(2, 8).requires_grad_()
    triplet_loss(a, a.detach().clone(), random_unit(2, 3, 8, seed=1), margin=4.0).backward()
    assert torch.isfinite(a.grad).all()


def test_hard_loss_dispatch() -> None:
    a, p, n = random_unit(2, 8), random_unit(2, 8, seed=1), random_unit(2, 3, 8, seed=2)
    assert hard_loss("sare_ind", a, p, n, tau=0.1) == sare_ind_loss(a, p, n, tau=0.1)
    assert hard_loss("triplet", a, p, n, margin=0.2) == triplet_loss(a, p, n, margin=0.2)
    with pytest.raises(ValueError, match="sare_joint"):
        hard_loss("contrastive", a, p, n)


def test_hardest_regions_selects_most_similar_region() -> None:
    anchor = torch.tensor([unit(0), unit(90)], dtype=torch.float64)  # [B=2, 2]
    # regions at these angles; the closest to the anchor's angle must be picked
    angles = [[[100, 10, 50], [170, 200, 60]], [[0, 80, 180], [95, 300, 90]]]  # [B, N=2, R=3]
    regions = torch.tensor(
        [[[unit(r) for r in neg] for neg in tup] for tup in angles], dtype=torch.float64
    ).requires_grad_()  # [2, 2, 3, 2]
    expected_region = [[1, 2], [1, 2]]
    picked = hardest_regions(anchor, regions)
    assert picked.shape == (2, 2, 2)
    for b in range(2):
        for j in range(2):
            torch.testing.assert_close(picked[b, j], regions[b, j, expected_region[b][j]])
    picked.sum().backward()
    selected = torch.zeros(2, 2, 3, dtype=torch.bool)
    for b in range(2):
        for j in range(2):
            selected[b, j, expected_region[b][j]] = True
    assert (regions.grad.abs().sum(-1) > 0).eq(selected).all()


# ---------------------------------------------------------------- soft loss


def soft_loss_loop(anchor, regions, prev_anchor, prev_regions, tau_prev, tau) -> float:
    total = 0.0
    batch, n_pos, n_reg, _ = regions.shape
    for b in range(batch):
        cur = [float(anchor[b] @ regions[b, p, r]) for p in range(n_pos) for r in range(n_reg)]
        prev = [
            float(prev_anchor[b] @ prev_regions[b, p, r])
            for p in range(n_pos)
            for r in range(n_reg)
        ]
        z_prev = sum(math.exp(s / tau_prev) for s in prev)
        z_cur = sum(math.exp(s / tau) for s in cur)
        total += -sum(
            math.exp(sp / tau_prev) / z_prev * (sc / tau - math.log(z_cur))
            for sp, sc in zip(prev, cur, strict=True)
        )
    return total / batch


def test_sfrs_soft_loss_matches_loop() -> None:
    anchor, regions = random_unit(2, 6, seed=10), random_unit(2, 3, 7, 6, seed=11)
    prev_anchor, prev_regions = random_unit(2, 6, seed=12), random_unit(2, 3, 7, 6, seed=13)
    for tau_prev in TAU_PER_GENERATION:
        expected = soft_loss_loop(anchor, regions, prev_anchor, prev_regions, tau_prev, TAU)
        got = sfrs_soft_loss(anchor, regions, prev_anchor, prev_regions, tau_prev=tau_prev)
        assert got.item() == pytest.approx(expected, rel=1e-10)


def test_sfrs_soft_loss_gradients() -> None:
    anchor, regions = random_unit(2, 6, seed=10), random_unit(2, 3, 7, 6, seed=11)
    prev_anchor, prev_regions = random_unit(2, 6, seed=12), random_unit(2, 3, 7, 6, seed=13)
    for t in (anchor, regions, prev_anchor, prev_regions):
        t.requires_grad_()
    sfrs_soft_loss(anchor, regions, prev_anchor, prev_regions, tau_prev=0.06).backward()
    assert prev_anchor.grad is None and prev_regions.grad is None
    assert anchor.grad.abs().sum() > 0 and regions.grad.abs().sum() > 0


def test_sfrs_soft_loss_is_stationary_when_models_agree() -> None:
    # with q = p the cross-entropy gradient p - q vanishes
    anchor = random_unit(2, 6, seed=10).requires_grad_()
    regions = random_unit(2, 3, 7, 6, seed=11)
    sfrs_soft_loss(anchor, regions, anchor.detach(), regions, tau_prev=TAU, tau=TAU).backward()
    torch.testing.assert_close(anchor.grad, torch.zeros_like(anchor), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- distillation


def test_row_normalised_gram_hand_value() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # G = [[1, 1], [1, 2]]
    expected = torch.tensor(
        [[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]]
    )
    torch.testing.assert_close(row_normalised_gram(x), expected)
    # any trailing shape is flattened per row
    torch.testing.assert_close(row_normalised_gram(x.view(2, 1, 2, 1)), expected)


def gram_loop(rows: list[list[float]]) -> list[list[float]]:
    gram = [[sum(u * v for u, v in zip(a, b, strict=True)) for b in rows] for a in rows]
    return [[g / math.sqrt(sum(h * h for h in row)) for g in row] for row in gram]


def intra_norm_loop(vlad: torch.Tensor) -> list[list[float]]:
    out = []
    for image in vlad.tolist():
        flat = []
        for cluster in image:
            norm = math.sqrt(sum(v * v for v in cluster))
            flat += [v / norm for v in cluster]
        out.append(flat)
    return out


def test_vlad_gram_loss_matches_loop_with_mismatched_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # K=3, D=5
    teacher = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)  # K=6, D=7
    g_s, g_t = gram_loop(intra_norm_loop(student)), gram_loop(intra_norm_loop(teacher))
    expected = sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    assert vlad_gram_loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)
    # a cached teacher VLAD (intra-normalised, flattened) gives the same value
    cached = intra_normalised_vlad(teacher)
    assert cached.shape == (4, 42)
    assert vlad_gram_loss(student, cached).item() == pytest.approx(expected, rel=1e-10)
    assert vlad_gram_loss(teacher, teacher).item() == 0.0


def test_centred_gram_ignores_what_all_images_share() -> None:
    """Descriptors = one large common part + small differences (the synthetic city's
    teacher): the uncentred Gram is flat, the centred one is the Gram of the differences."""
    g = torch.Generator().manual_seed(0)
    differences = torch.randn(6, 40, generator=g, dtype=torch.float64)
    shared = 100 * torch.randn(1, 40, generator=g, dtype=torch.float64)
    teacher = shared + differences
    flat = row_normalised_gram(teacher)
    assert (flat - flat.mean()).abs().max() < 0.01  # every image alike
    centred_rows = (differences - differences.mean(0)).tolist()
    torch.testing.assert_close(row_normalised_gram(teacher, center=True), torch.tensor(gram_loop(centred_rows), dtype=torch.float64))
    student = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    as_vlad = differences.view(6, 40)
    assert vlad_gram_loss(student, teacher, center=True).item() == pytest.approx(
        vlad_gram_loss(student, as_vlad, center=True).item(), rel=1e-9
    )
    terms = distill_loss(student, teacher, None, None, use_attention=False, center=True)
    assert terms["vlad"].item() == pytest.approx(vlad_gram_loss(student, teacher, center=True).item())
    assert terms["vlad"].item() != pytest.approx(vlad_gram_loss(student, teacher).item())


def test_attention_gram_loss_mismatched_sizes_and_cached_teacher() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 8, 4, 6, generator=g)
    teacher = torch.randn(5, 16, 7, 3, generator=g)
    g_s = gram_loop(attention_map(student).tolist())
    g_t = gram_loop(attention_map(teacher).tolist())
    expected = sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    live = attention_gram_loss(student, teacher)
    assert live.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(attention_gram_loss(student, attention_map(teacher)), live)


def test_distill_loss_switches_and_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    s_vlad = torch.randn(4, 3, 5, generator=g).requires_grad_()
    t_vlad = torch.randn(4, 6, 7, generator=g).requires_grad_()
    s_feat = torch.randn(4, 8, 4, 6, generator=g).requires_grad_()
    t_feat = torch.randn(4, 16, 7, 3, generator=g).requires_grad_()

    both = distill_loss(s_vlad, t_vlad, s_feat, t_feat)
    assert set(both) == {"vlad", "attention", "total"}
    torch.testing.assert_close(both["vlad"], vlad_gram_loss(s_vlad, t_vlad))
    torch.testing.assert_close(both["attention"], attention_gram_loss(s_feat, t_feat))
    torch.testing.assert_close(both["total"], both["vlad"] + both["attention"])

    both["total"].backward()
    assert s_vlad.grad.abs().sum() > 0 and s_feat.grad.abs().sum() > 0
    assert t_vlad.grad is None and t_feat.grad is None  # the teacher is a fixed target

    only_vlad = distill_loss(s_vlad, t_vlad, None, None, use_attention=False)
    assert set(only_vlad) == {"vlad", "total"}
    torch.testing.assert_close(only_vlad["total"], both["vlad"])

    only_att = distill_loss(None, None, s_feat, attention_map(t_feat), use_vlad=False)
    assert set(only_att) == {"attention", "total"}
    torch.testing.assert_close(only_att["total"], both["attention"])

    with pytest.raises(ValueError):
        distill_loss(s_vlad, t_vlad, s_feat, t_feat, use_vlad=False, use_attention=False)
    with pytest.raises(ValueError):
        distill_loss(None, t_vlad, s_feat, t_feat)
