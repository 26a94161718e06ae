"""wakd against the reference's own outputs (XuYifan98/WAKD, OpenIBL's fork), without it.

tests/fixtures/reference_parity.npz holds tiny inputs (``in_*``) and what the reference
code computed from them (``ref_*``), written by ``bench/reference_parity.py REFERENCE_DIR
--write-fixture`` (provenance: tests/fixtures/README.md and the fixture's ``meta``). Each
test rebuilds the same quantity with wakd from the same inputs and weights.

The tuple "images" are feature maps: the reference ran with a base model returning its
input (student) or a fixed 3x3 stride-2 conv of it (teacher), so these gradients are
w.r.t. the student's feature maps.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from wakd.data.datasets import PlaceSplit
from wakd.data.tuple_miner import TupleMiner
from wakd.eval.recall import dedup_by_group, recall_at_n
from wakd.knn import knn_search
from wakd.losses import (
    attention_map,
    distill_loss,
    hardest_regions,
    intra_normalised_vlad,
    sare_ind_loss,
    sare_joint_loss,
    sfrs_soft_loss,
    teacher_targets,
    triplet_loss,
)
from wakd.models.backbones import Backbone
from wakd.models.netvlad import NetVLAD
from wakd.models.pca import PCAWhitening
from wakd.models.place_net import PlaceNet
from wakd.modules.place_module import PlaceModule, reference_gram_rows

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "reference_parity.npz"
RTOL = 1e-5  # of the reference's largest magnitude
# The reference's settings (scripts/train_wakd_st.sh, netvlad_wakd_st.py, update_sampler).
N, P = 3, 3  # negatives, soft positives per tuple
T = 2 + N + P
TAUS = (0.07, 0.07, 0.06, 0.05)
MARGIN = 0.1**0.5
SOFT_WEIGHT, DISTILL_WEIGHT = 0.5, 100.0
POS_POOL, NEG_POOL, DB_PER_PANORAMA = 20, 40, 4
RECALL_NS = (1, 5, 10, 15, 20, 25)


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as data:
        return dict(data)


def close(wakd: Tensor | np.ndarray | float, ref: np.ndarray, rtol: float = RTOL) -> None:
    """max |wakd - ref| <= rtol * max |ref| (elementwise relative errors blow up near zero)."""
    a = np.asarray(wakd.detach() if isinstance(wakd, Tensor) else wakd, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.abs(b).max())
    assert scale > 0
    err = float(np.abs(a - b).max())
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} x {scale:.3g}"


def netvlad(fx: dict[str, np.ndarray], prefix: str) -> NetVLAD:
    conv, centroids = fx[f"in_{prefix}conv"], fx[f"in_{prefix}centroids"]
    net = NetVLAD(*conv.shape)
    with torch.no_grad():
        net.conv.weight.copy_(torch.from_numpy(conv)[:, :, None, None])
        net.centroids.copy_(torch.from_numpy(centroids))
    return net


def teacher_conv(fx: dict[str, np.ndarray]) -> nn.Conv2d:
    w = torch.from_numpy(fx["in_teacher_conv_w"])
    conv = nn.Conv2d(w.shape[1], w.shape[0], 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.from_numpy(fx["in_teacher_conv_b"]))
    return conv.requires_grad_(False)


def features(fx: dict[str, np.ndarray]) -> Tensor:
    """The fixture's tuple of T feature maps [1, T, C, H, W], as a leaf that takes gradients."""
    return torch.from_numpy(fx["in_features"][:1].copy()).requires_grad_(True)


def test_fixture_provenance(fx: dict[str, np.ndarray]) -> None:
    meta = json.loads(str(fx["meta"]))
    assert meta["reference"] == "https://github.com/XuYifan98/WAKD"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["reference_commit"])
    assert FIXTURE.stat().st_size < 200 * 1024


# ------------------------------------------------------------------------ NetVLAD


def test_netvlad_initialisation_matches_reference(fx: dict[str, np.ndarray]) -> None:
    net = NetVLAD(*fx["in_init_centroids"].shape)
    net.init_from_centroids(torch.from_numpy(fx["in_init_centroids"]), torch.from_numpy(fx["in_init_desc"]))
    close(net.conv.weight[:, :, 0, 0], fx["ref_init_conv"])
    close(net.centroids, fx["in_init_centroids"])


def test_netvlad_outputs_match_reference(fx: dict[str, np.ndarray]) -> None:
    net = netvlad(fx, "vlad_")
    x = torch.from_numpy(fx["in_features"][0])
    with torch.no_grad():
        close(net.vlad(x), fx["ref_vlad_intra"])
        close(net(x), fx["ref_vlad_global"])
        close(net.region_descriptors(x), fx["ref_vlad_regions"])  # global, 3 rows, 3 columns


# -------------------------------------------------------------------- hard losses


@pytest.mark.parametrize("name", ["sare_ind", "sare_joint", "triplet"])
@pytest.mark.parametrize("kind", ["sfrs", "baseline"])
def test_hard_losses_match_reference(fx: dict[str, np.ndarray], name: str, kind: str) -> None:
    """``sfrs``: the SFRS/WAKD trainer (dot products / 0.07); ``baseline``: OpenIBL's
    baseline trainer (-squared L2 distances), reproduced by experiment=baseline's tau."""
    tau = TAUS[0]
    if kind == "baseline":
        tau = OmegaConf.load(REPO / "configs" / "experiment" / "baseline.yaml").module.loss.tau
    fn = {"sare_ind": sare_ind_loss, "sare_joint": sare_joint_loss, "triplet": triplet_loss}[name]
    v = torch.from_numpy(fx["in_loss_desc"].copy()).requires_grad_(True)
    d = F.normalize(v, dim=-1)
    loss = fn(d[:, 0], d[:, 1], d[:, 2:], **({"margin": MARGIN} if name == "triplet" else {"tau": tau}))
    loss.backward()
    close(loss.item(), fx[f"ref_{kind}_{name}"])
    close(v.grad, fx[f"ref_{kind}_{name}_grad"])


def test_baseline_sare_is_not_the_sfrs_sare(fx: dict[str, np.ndarray]) -> None:
    """The two trainers' SARE differ (else the baseline's tau would be untested)."""
    assert abs(float(fx["ref_baseline_sare_ind"]) - float(fx["ref_sfrs_sare_ind"])) > 0.1


# ----------------------------------------------------------------- one SFRS step


@pytest.mark.parametrize("gen", [0, 1, 2, 3])
def test_sfrs_losses_match_reference(fx: dict[str, np.ndarray], gen: int) -> None:
    net, prev = netvlad(fx, "vlad_"), netvlad(fx, "prev_")
    feats = features(fx)
    regions = net.region_descriptors(feats.flatten(0, 1)).view(1, T, 7, -1)  # [1, T, R, K*D]
    anchor = regions[:, 0, 0]
    # generation 0: the negatives' global descriptors; later: each one's region most
    # similar to the anchor
    negatives = regions[:, 2 : 2 + N, 0] if gen == 0 else hardest_regions(anchor, regions[:, 2 : 2 + N])
    loss_hard = sare_ind_loss(anchor, regions[:, 1, 0], negatives, tau=TAUS[0])
    with torch.no_grad():
        soft_images = torch.cat([feats[:, :1], feats[:, 2 + N :]], 1).flatten(0, 1)
        prev_regions = prev.region_descriptors(soft_images).view(1, 1 + P, 7, -1)
    loss_soft = sfrs_soft_loss(anchor, regions[:, 2 + N :], prev_regions[:, 0, 0], prev_regions[:, 1:],
                               tau_prev=TAUS[gen], tau=TAUS[0])
    (loss_hard + (SOFT_WEIGHT if gen > 0 else 0.0) * loss_soft).backward()
    close(loss_hard.item(), fx[f"ref_sfrs_b1_gen{gen}_hard"])
    close(loss_soft.item(), fx[f"ref_sfrs_b1_gen{gen}_soft"])
    close(feats.grad, fx[f"ref_sfrs_b1_gen{gen}_grad"])


def test_region_negatives_change_the_hard_loss(fx: dict[str, np.ndarray]) -> None:
    assert abs(float(fx["ref_sfrs_b1_gen0_hard"]) - float(fx["ref_sfrs_b1_gen1_hard"])) > 1e-3


# ------------------------------------------------------------------ distillation


def test_attention_maps_and_distillation_match_reference(fx: dict[str, np.ndarray]) -> None:
    """The reference's Grad-CAM (inner backward) against wakd's closed form, on the 9 rows
    of its Grams (hard tuple, then anchor + soft positives), and the loss and its gradient."""
    net, t_vlad, t_conv = netvlad(fx, "vlad_"), netvlad(fx, "teacher_vlad_"), teacher_conv(fx)
    feats = features(fx)
    rows = reference_gram_rows(N, P)
    assert rows.tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7]
    f = feats[0][rows]
    with torch.no_grad():
        tf = t_conv(f)
        t_flat, t_att = teacher_targets(t_vlad.vlad(tf), tf)
    close(attention_map(f), fx["ref_kd_att_student"])
    close(t_att, fx["ref_kd_att_teacher"])
    close(intra_normalised_vlad(net.vlad(f)), fx["ref_kd_vlad_student"])
    close(t_flat, fx["ref_kd_vlad_teacher"])
    loss = distill_loss(net.vlad(f), t_flat, f, t_att)["total"]
    loss.backward()
    close(loss.item(), fx["ref_kd_b1"])
    close(feats.grad, fx["ref_kd_b1_grad"])


def _feature_net(pool: NetVLAD, conv: nn.Module | None = None) -> PlaceNet:
    """A PlaceNet whose backbone is the identity (or ``conv``) on feature-map images."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if conv is not None:
        layers["conv"] = conv
    backbone = Backbone("features", layers, pool.dim, 1 if conv is None else 2)
    backbone.normalize = nn.Identity()  # the inputs are features, not pixels
    return PlaceNet(backbone, pool)


@pytest.mark.parametrize("gen", [0, 1])
def test_training_step_matches_reference(fx: dict[str, np.ndarray], gen: int) -> None:
    """PlaceModule.training_step against netvlad_wakd_st.py's step:
    hard + soft_weight * soft (from generation 1) + 100 * (VLAD Gram + attention Gram)."""
    module = PlaceModule(
        _feature_net(netvlad(fx, "vlad_")),
        optimizer=torch.optim.SGD,
        loss={"tau": TAUS[0], "soft_weight": SOFT_WEIGHT, "tau_per_generation": TAUS},
        schedule={"generations": len(TAUS)},
        teacher=_feature_net(netvlad(fx, "teacher_vlad_"), teacher_conv(fx)),
        distill={"weight": DISTILL_WEIGHT},
        pos_num=P,
    )
    module.generation = gen
    if gen > 0:  # set as start_round would: the previous generation's network, frozen
        object.__setattr__(module, "prev_net", _feature_net(netvlad(fx, "prev_")).eval().requires_grad_(False))
    feats = features(fx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        loss = module.training_step((feats, torch.zeros(1, T, dtype=torch.long)), 0)
    loss.backward()
    close(loss.item(), fx[f"ref_step_gen{gen}"])
    close(feats.grad, fx[f"ref_step_gen{gen}_grad"])


# ------------------------------------------------------------- mining and recall


def _split(fx: dict[str, np.ndarray], tmp_path: Path) -> PlaceSplit:
    db_utm, q_utm = fx["in_db_utm"], fx["in_q_utm"]
    return PlaceSplit(
        name="synthcity", split="train", root=tmp_path,
        db_rel=[f"db{j:03d}.jpg" for j in range(len(db_utm))],
        q_rel=[f"q{i:03d}.jpg" for i in range(len(q_utm))],
        db_utm=db_utm, q_utm=q_utm, db_group_ids=np.arange(len(db_utm)) // DB_PER_PANORAMA,
    )


def _padded(lists: list[np.ndarray]) -> np.ndarray:
    width = max(len(x) for x in lists)
    return np.array([sorted(x.tolist()) + [-1] * (width - len(x)) for x in lists])


class FixedCandidates:
    """The miner's random generator, replaced by the fixture's negative candidates per query."""

    def __init__(self, candidates: np.ndarray) -> None:
        self.rows = iter(candidates)

    def choice(self, *args: object, **kwargs: object) -> np.ndarray:
        return next(self.rows)


def test_ground_truth_matches_reference(fx: dict[str, np.ndarray], tmp_path: Path) -> None:
    split = _split(fx, tmp_path)
    np.testing.assert_array_equal(_padded(split.train_positives()), fx["ref_gt_train_pos"])
    np.testing.assert_array_equal(_padded(split.non_negatives()), fx["ref_gt_non_neg"])
    np.testing.assert_array_equal(_padded(split.eval_positives()), fx["ref_gt_eval_pos"])


def test_mined_tuples_match_reference(fx: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Three rounds on fixed descriptors and fixed negative candidates: a fresh one, one
    that also uses round 0's negatives, one with SFRS re-ranking (the reference's k1=20,
    k2=1, lambda=0.1 and its "gain" rule; the reference handed L2 distances, see below)."""
    miner = TupleMiner(_split(fx, tmp_path), pos_num=P, neg_num=N, pos_pool=POS_POOL, neg_pool=NEG_POOL,
                       rerank_k1=20, rerank_k2=1, rerank_lambda=0.1, rerank_select="gain")
    for r, ref_key in enumerate(["mined_0", "mined_1", "mined_2_rerank_l2"]):
        tuples = miner.mine(np.arange(len(fx["in_q_utm"])), fx[f"in_q_desc_{r}"], fx[f"in_db_desc_{r}"],
                            FixedCandidates(fx[f"in_neg_candidates_{r}"]), rerank=r == 2)  # type: ignore[arg-type]
        got = np.array([[t.query, t.hard_positive, *t.negatives, *t.positives] for t in tuples])
        want = fx[f"ref_{ref_key}"]
        assert (want >= 0).all()  # no short "gain" lists here: every column is compared
        np.testing.assert_array_equal(got, want, err_msg=ref_key)
        if r == 0:  # OpenIBL's baseline sampler mines the same anchor, positive, negatives
            np.testing.assert_array_equal(got[:, : 2 + N], fx["ref_mined_baseline_0"])
    # The cache and the re-ranking did something, so the rounds above test them.
    from_cache = [not np.isin(row[2 : 2 + N], cand).all()
                  for row, cand in zip(fx["ref_mined_1"], fx["in_neg_candidates_1"], strict=True)]
    assert any(from_cache)
    assert (fx["ref_mined_2_rerank_l2"][:, 2 + N] != fx["ref_mined_2_rerank_l2"][:, 1]).any()


def test_reference_script_rerank_squares_distances_twice(fx: dict[str, np.ndarray]) -> None:
    """OpenIBL's script hands re_ranking squared distances, which it squares again; wakd
    follows Zhong et al. (squared L2). Only the re-ranked soft positives can differ."""
    script, l2 = fx["ref_mined_2_rerank_script"], fx["ref_mined_2_rerank_l2"]
    np.testing.assert_array_equal(script[:, : 2 + N], l2[:, : 2 + N])
    assert (script[:, 2 + N :] != l2[:, 2 + N :]).any()


def test_recall_matches_reference(fx: dict[str, np.ndarray], tmp_path: Path) -> None:
    split = _split(fx, tmp_path)
    q, db = fx["in_q_desc_eval"], fx["in_db_desc_eval"]
    dist, idx = knn_search(db, q, len(db), use_gpu=False)
    recall = recall_at_n(idx, split.eval_positives(), RECALL_NS)
    np.testing.assert_allclose([recall[n] for n in RECALL_NS], fx["ref_recall"], atol=1e-12)
    dd_idx, _ = dedup_by_group(idx, dist, split.db_group_ids, max(RECALL_NS))
    recall = recall_at_n(dd_idx, split.eval_positives(), RECALL_NS)  # Tokyo's per-panorama rule
    np.testing.assert_allclose([recall[n] for n in RECALL_NS], fx["ref_recall_nms"], atol=1e-12)
    assert not np.array_equal(fx["ref_recall"], fx["ref_recall_nms"])  # de-duplication mattered


@pytest.mark.parametrize(("name", "n_fit"), [("pca_primal", None), ("pca_dual", 20)])
def test_pca_whitening_matches_reference(fx: dict[str, np.ndarray], name: str, n_fit: int | None) -> None:
    """The reference fits in float32 (torch.symeig, shimmed to eigh), wakd in float64."""
    x = torch.from_numpy(fx["in_pca_desc"])
    out = PCAWhitening.fit(x[:n_fit], fx[f"ref_{name}"].shape[1], whiten=True)(x).numpy()
    ref = fx[f"ref_{name}"]
    out = out * np.sign((out * ref).sum(axis=0, keepdims=True))  # eigenvectors have no sign
    close(out, ref)
