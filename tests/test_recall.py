"""knn_search, recall_at_n and dedup_by_group against straightforward brute force."""

from __future__ import annotations

import numpy as np
import pytest

from wakd.eval.recall import dedup_by_group, recall_at_n
from wakd.knn import gpu_available, knn_search

RADIUS_M = 25.0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _scene(seed: int = 0, num_db: int = 300, num_q: int = 80, dim: int = 32):
    """Random UTM layout with descriptors that make retrieval neither trivial nor hopeless.

    Each query copies a random database image's descriptor plus noise of varying
    strength; a fifth of the queries lie 10 km away and have no positives at all.
    """
    rng = np.random.default_rng(seed)
    db_utm = rng.uniform(0, 250, size=(num_db, 2))  # [N,2]
    db_desc = _unit(rng.standard_normal((num_db, dim)))  # [N,D]
    anchors = rng.integers(0, num_db, num_q)  # [Q]
    q_utm = db_utm[anchors] + rng.normal(0, 8, size=(num_q, 2))  # [Q,2]
    q_utm[: num_q // 5] += 10_000.0
    noise = rng.uniform(0.1, 1.5, size=(num_q, 1))
    q_desc = _unit(db_desc[anchors] + noise * rng.standard_normal((num_q, dim)) / np.sqrt(dim))
    # Brute-force positives: full pairwise metric distances.
    geo = np.linalg.norm(q_utm[:, None, :] - db_utm[None, :, :], axis=2)  # [Q,N]
    positives = [np.flatnonzero(row <= RADIUS_M) for row in geo]
    return db_desc, q_desc, positives


def _brute_force_knn(db: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full [Q,N] squared-L2 matrix in float64 and a full stable argsort."""
    db64, q64 = db.astype(np.float64), q.astype(np.float64)
    dist = ((q64[:, None, :] - db64[None, :, :]) ** 2).sum(axis=2)  # [Q,N]
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), order


def _loop_recall(ranking: np.ndarray, positives, ns) -> dict[int, float]:
    return {
        n: sum(bool(set(ranking[q, :n].tolist()) & set(positives[q].tolist()))
               for q in range(len(positives))) / len(positives)
        for n in ns
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("db_chunk", "q_chunk"), [(64, 16), (97, 33), (1000, 1000), (7, 80)])
def test_knn_matches_brute_force(dtype, db_chunk, q_chunk):
    db, q, _ = _scene(seed=1)
    db, q = db.astype(dtype), q.astype(dtype)
    k = 20
    dist, idx = knn_search(db, q, k, db_chunk=db_chunk, q_chunk=q_chunk, use_gpu=False)
    ref_dist, ref_idx = _brute_force_knn(db, q)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert dist.shape == idx.shape == (q.shape[0], k)
    np.testing.assert_array_equal(idx, ref_idx[:, :k])
    np.testing.assert_allclose(dist, ref_dist[:, :k], rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_knn_clamps_k_and_breaks_ties_by_index():
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((2, 16))).astype(np.float32)
    db = base[np.arange(11) % 2]  # rows 0,2,4,... equal base[0]; 1,3,5,... equal base[1]
    q = base[:1].repeat(5, axis=0)
    dist, idx = knn_search(db, q, k=50, db_chunk=3, q_chunk=2, use_gpu=False)
    assert idx.shape == (5, 11)  # k clamped to N
    np.testing.assert_array_equal(idx[:, :6], np.tile([0, 2, 4, 6, 8, 10], (5, 1)))
    np.testing.assert_array_equal(idx[:, 6:], np.tile([1, 3, 5, 7, 9], (5, 1)))
    np.testing.assert_allclose(dist[:, :6], 0.0, atol=1e-6)


@pytest.mark.skipif(gpu_available(), reason="a GPU faiss is present")
def test_knn_use_gpu_without_gpu_raises():
    db, q, _ = _scene(num_db=10, num_q=3)
    with pytest.raises(RuntimeError):
        knn_search(db.astype(np.float32), q.astype(np.float32), 2, use_gpu=True)


def test_recall_matches_brute_force():
    db, q, positives = _scene(seed=3)
    ns = (1, 5, 10, 20)
    _, idx = knn_search(db.astype(np.float16), q.astype(np.float16), 20, db_chunk=50, use_gpu=False)
    _, ranking = _brute_force_knn(db.astype(np.float16), q.astype(np.float16))
    got = recall_at_n(idx, positives, ns)
    want = _loop_recall(ranking, positives, ns)
    assert got == pytest.approx(want, abs=1e-12)
    # The scene must exercise both outcomes, and queries without positives cap recall.
    no_pos = sum(p.size == 0 for p in positives)
    assert no_pos == len(positives) // 5
    assert 0.0 < got[1] < got[20] <= 1.0 - no_pos / len(positives)


def test_recall_padding_duplicates_and_errors():
    topk = np.array([[3, -1, -1], [-1, -1, -1], [5, 2, 2], [0, 1, 4]])
    positives = [np.array([3, 9]), np.array([], dtype=np.int64), np.array([2, 2, 9]), np.array([4])]
    # -1 must never match, not even the last database index of the previous query's key range.
    assert recall_at_n(topk, positives, (1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}
    with pytest.raises(ValueError):
        recall_at_n(topk, positives, (4,))
    with pytest.raises(ValueError):
        recall_at_n(topk, positives[:3], (1,))


def _loop_dedup(indices, distances, group_ids, k):
    out_i = np.full((indices.shape[0], k), -1, dtype=np.int64)
    out_d = np.full((indices.shape[0], k), np.inf, dtype=np.float32)
    for r in range(indices.shape[0]):
        seen, j = set(), 0
        for i, d in zip(indices[r], distances[r], strict=True):
            if i < 0 or group_ids[i] in seen or j == k:
                continue
            seen.add(group_ids[i])
            out_i[r, j], out_d[r, j] = i, d
            j += 1
    return out_i, out_d


@pytest.mark.parametrize("k", [1, 5, 40])
def test_dedup_matches_loop(k):
    rng = np.random.default_rng(4)
    num_db, width = 240, 30
    group_ids = rng.permutation(num_db) // 12 * 7 + 1000  # 20 panoramas, sparse ids
    indices = np.stack([rng.choice(num_db, width, replace=False) for _ in range(25)])
    indices[::4, -6:] = -1  # padded rows
    distances = np.sort(rng.uniform(0, 2, size=indices.shape), axis=1).astype(np.float32)
    distances[indices < 0] = np.inf
    got_i, got_d = dedup_by_group(indices, distances, group_ids, k)
    want_i, want_d = _loop_dedup(indices, distances, group_ids, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    kept = got_i[got_i >= 0]
    assert kept.size > 0
    for row in got_i:
        groups = group_ids[row[row >= 0]]
        assert len(set(groups.tolist())) == groups.size
