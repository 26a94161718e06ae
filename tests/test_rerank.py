"""k-reciprocal re-ranking: against a brute-force implementation, and its use in mining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg

from wakd.data.datasets import PlaceSplit
from wakd.data.rerank import k_reciprocal_distances
from wakd.data.tuple_miner import TupleMiner, select_positives
from wakd.jobs import train
from wakd.knn import knn_graph


def brute_force_rerank(x: np.ndarray, k1: int, k2: int, lam: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Zhong et al. 2017 on the full N x N matrix, with plain loops and sets (float64).

    Returns (final, jaccard, number of rows whose k-reciprocal set the expansion grew).
    """
    n = len(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d = d / d.max(axis=1, keepdims=True)  # each row by its maximum
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> set[int]:
        return {int(j) for j in rank[i, : k + 1] if i in set(rank[j, : k + 1].tolist())}

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    grown = 0
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        grown += len(expanded) > len(r)
        cols = sorted(expanded)
        w = np.exp(-d[i, cols])
        v[i, cols] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            jac[i, j] = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
    return (1 - lam) * jac + lam * d, jac, grown


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (8, 3, 0.1), (8, 1, 0.5)])
def test_matches_brute_force(k1: int, k2: int, lam: float) -> None:
    rng = np.random.default_rng(k1)
    # Clustered points, so that neighbourhoods are reciprocal and expansions happen.
    centres = rng.normal(size=(6, 16))
    x = (centres[rng.integers(0, 6, 90)] + 0.6 * rng.normal(size=(90, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    want_final, want_jac, grown = brute_force_rerank(x.astype(np.float64), k1, k2, lam)
    a = np.repeat(np.arange(0, 90, 7), 90)
    b = np.tile(np.arange(90), len(np.arange(0, 90, 7)))
    final, jac = k_reciprocal_distances(x, a, b, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(jac, want_jac[a, b], atol=2e-5)
    np.testing.assert_allclose(final, want_final[a, b], atol=2e-5)
    assert (want_jac[a, b] < 1).mean() > 0.1  # the test data have non-trivial overlaps
    assert k1 != 8 or grown > 0  # and, for k1 = 8, expanded k-reciprocal sets
    # The pairs' distances handed in (a mining round has them) give the same result.
    known = ((x[a].astype(np.float64) - x[b]) ** 2).sum(1)
    given, _ = k_reciprocal_distances(x, a, b, k1=k1, k2=k2, lambda_value=lam, pair_distances=known)
    np.testing.assert_allclose(given, final, atol=1e-6)
    with pytest.raises(ValueError, match="pair_distances has shape"):
        k_reciprocal_distances(x, a, b, k1=k1, k2=k2, lambda_value=lam, pair_distances=known[1:])


def test_knn_graph_chunks_agree_with_full_sort() -> None:
    x = torch.randn(50, 8)
    d, i, row_max, _ = knn_graph(x.numpy(), 6, q_chunk=7, db_chunk=11)
    full = torch.cdist(x.double(), x.double()).pow(2)
    want = full.sort(dim=1)
    np.testing.assert_array_equal(i, want.indices[:, :6].numpy())
    np.testing.assert_allclose(d, want.values[:, :6].numpy(), atol=1e-5)
    np.testing.assert_allclose(row_max, full.max(1).values.numpy(), rtol=1e-5)
    assert (i[:, 0] == np.arange(50)).all() and (d[:, 0] == 0).all()


def test_knn_graph_in_one_block_of_several_stripes() -> None:
    """600 rows: one diagonal block, the same neighbours as a full sort."""
    x = torch.randn(600, 16)
    d, i, row_max, _ = knn_graph(x.numpy(), 5)
    full = torch.cdist(x.double(), x.double()).pow(2)
    want = full.sort(dim=1)
    np.testing.assert_array_equal(i, want.indices[:, :5].numpy())
    np.testing.assert_allclose(d, want.values[:, :5].numpy(), atol=1e-4)
    np.testing.assert_allclose(row_max, full.max(1).values.numpy(), rtol=1e-5)


def test_knn_graph_with_duplicates_and_fp16() -> None:
    """Rows repeated k + 1 times: each keeps itself at distance 0, ties go to lower indices,
    and the farthest-row maxima are exact whatever the chunking."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float16)
    x[10:15] = x[10]  # five identical rows, more than k = 3 neighbours can hold
    d, i, row_max, _ = knn_graph(x, 3, q_chunk=4, db_chunk=7)
    assert (i == np.arange(30)[:, None]).any(axis=1).all()  # every row in its own list
    assert (d[np.arange(30)[:, None] == i] == 0).all()
    np.testing.assert_array_equal(i[12], [10, 11, 12])  # equal distances: lower index first
    full = ((x[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(row_max, full.max(1), rtol=1e-6)


def test_knn_graph_row_maxima_of_near_duplicates() -> None:
    """Rows far from the origin and close to each other: faiss's |a|^2 + |b|^2 - 2<a, b>
    cancels to noise there (distances ~1e-2 against norms ~6e4; it is off by up to 40 %), so
    the maxima are direct differences to the row the pass found farthest (that choice is
    itself noisy); ordinary rows keep the pass's own values, within fp32 rounding."""
    rng = np.random.default_rng(3)
    x = (30.0 + 1e-2 * rng.normal(size=(40, 64))).astype(np.float32)
    row_max = knn_graph(x, 4).row_max
    full = ((x[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    nearest_entry = np.abs(full - row_max[:, None]).min(1)
    assert (nearest_entry <= 1e-5 * row_max).all()  # a real distance of the row, not noise
    assert (row_max >= 0.5 * full.max(1)).all()
    x = rng.normal(size=(40, 64)).astype(np.float32)
    row_max = knn_graph(x, 4).row_max
    full = ((x[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(row_max, full.max(1), rtol=1e-5)


def test_select_positives_top_and_gain() -> None:
    pool = np.array([10, 11, 12, 13, 14])  # ordered by the original distance
    reranked = np.array([0.5, 0.1, 0.4, 0.2, 0.9])  # re-ranked order: 11, 13, 12, 10, 14
    np.testing.assert_array_equal(select_positives(pool, reranked, 3, "top"), [11, 13, 12])
    # OpenIBL: positives that rose most under re-ranking first, then unmoved ones; 10 fell.
    np.testing.assert_array_equal(select_positives(pool, reranked, 3, "gain"), [13, 11, 12])
    np.testing.assert_array_equal(select_positives(pool, None, 2, "top"), [10, 11])


def _split_one_query() -> PlaceSplit:
    """One query with 5 database images within 10 m and 30 others far away."""
    near = np.array([[0.0, 1.0]] * 5)
    far = np.stack([np.arange(30) * 40.0 + 100.0, np.zeros(30)], axis=1)
    return PlaceSplit(
        name="toy", split="train", root=".",
        db_rel=[f"db{i}.jpg" for i in range(35)], q_rel=["q0.jpg"],
        db_utm=np.concatenate([near, far]), q_utm=np.zeros((1, 2)),
    )


def test_mining_reranks_positives_only_when_asked() -> None:
    """The nearest positive has no shared neighbours with the query: re-ranking drops it.

    Descriptors: query at 0; positives db 0-3 at distance 1 along e0..e3 (the query's
    k-reciprocal group); positive db 4 nearest (0.8 along e4), but its own neighbours are
    30 far-away database images clustered just beyond it (1.1 along e4), so it is no
    k-reciprocal neighbour of the query and shares nothing with it.
    """
    rng = np.random.default_rng(0)
    dim = 8
    eye = np.eye(dim)
    q_desc = 0.01 * rng.normal(size=(1, dim))
    group = eye[:4] + 0.02 * rng.normal(size=(4, dim))
    lone = 0.8 * eye[4:5]
    cloud = 1.1 * eye[4] + 0.1 * rng.normal(size=(30, dim))
    db_desc = np.concatenate([group, lone, cloud])
    q_desc, db_desc = q_desc.astype(np.float16), db_desc.astype(np.float16)
    miner = TupleMiner(_split_one_query(), pos_num=2, neg_num=1, pos_pool=5, neg_pool=30,
                       rerank_k1=4, rerank_k2=1, rerank_lambda=0.3)

    plain = miner.mine(np.array([0]), q_desc, db_desc, np.random.default_rng(0))[0]
    assert plain.positives[0] == 4  # nearest by the original distance
    reranked = miner.mine(np.array([0]), q_desc, db_desc, np.random.default_rng(0), rerank=True)[0]
    assert 4 not in reranked.positives and set(reranked.positives) <= {0, 1, 2, 3}


def test_training_reranks_positives_from_generation_one(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    mine = TupleMiner.mine

    def spy(self: TupleMiner, *args, rerank: bool = False, **kwargs):
        calls.append(rerank)
        return mine(self, *args, rerank=rerank, **kwargs)

    monkeypatch.setattr(TupleMiner, "mine", spy)
    overrides = [*TINY_TRAIN, "teacher=none", "module.schedule.generations=2", "module.schedule.passes=1", "trainer.limit_train_batches=1"]
    train.run(compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run"))
    assert calls == [False, True]  # round 0 is generation 0, round 1 generation 1
