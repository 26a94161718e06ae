"""Search by config (wakd.ann): approximate indexes against brute force in numpy, config errors,
and retrieval's handling of skipped database images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wakd.ann import SearchSpec, search
from wakd.data.datasets import PlaceSplit
from wakd.eval.retrieval import retrieve
from wakd.knn import knn_search
from wakd.store import open_store, write_store

NUM_DB, NUM_Q, DIM, CLUSTERS = 4000, 300, 32, 40


def _clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fp16 unit rows around CLUSTERS centres; each query a noisy copy of a database row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM))
    db = centres[rng.integers(0, CLUSTERS, NUM_DB)] + 0.4 * rng.standard_normal((NUM_DB, DIM))  # [N, D]
    q = db[rng.integers(0, NUM_DB, NUM_Q)] + 0.1 * rng.standard_normal((NUM_Q, DIM))  # [Q, D]
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (db, q)]
    return unit[0].astype(np.float16), unit[1].astype(np.float16)


def _brute_force(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Top-k indices [Q, k] by squared L2 in float64, the whole matrix at once."""
    db64, q64 = db.astype(np.float64), q.astype(np.float64)
    d2 = (q64**2).sum(1)[:, None] + (db64**2).sum(1)[None, :] - 2 * q64 @ db64.T  # [Q, N]
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database memory-mapped from a store, queries, brute-force top-10)."""
    db, q = _clustered()
    path = tmp_path_factory.mktemp("store") / "db.npy"
    with write_store(path, rows=NUM_DB) as writer:
        for block in np.array_split(db, 3):
            writer.append(block)
    return open_store(path), q, _brute_force(db, q, 10)


def _recall_of_true_neighbours(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k found among the returned top-k."""
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_exact_matches_brute_force(data) -> None:
    db, q, truth = data
    _, idx = search(db, q, 10)  # default: wakd.knn, unchanged
    assert _recall_of_true_neighbours(idx, truth) > 0.999  # fp32 vs fp64 may swap near-ties only
    np.testing.assert_array_equal(idx[:, 0], truth[:, 0])


@pytest.mark.parametrize(
    ("index", "params"),
    [("IVF64,Flat", {"nprobe": 8}), ("IVF64,SQfp16", {"nprobe": 8}), ("HNSW16", {"ef_search": 64})],
)
def test_approximate_index_close_to_brute_force(data, index: str, params: dict) -> None:
    db, q, truth = data
    spec = SearchSpec.from_config({"index": index, "train_size": 2560, **params}, seed=1)
    dist, idx = search(db, q, 10, spec)
    assert idx.shape == dist.shape == (NUM_Q, 10) and idx.dtype == np.int64
    assert np.all(np.diff(dist, axis=1) >= 0)  # ascending
    assert np.mean(idx[:, 0] == truth[:, 0]) >= 0.95  # nearest neighbour found for >= 95 % of queries
    assert _recall_of_true_neighbours(idx, truth) >= 0.9


def test_ivf_visiting_every_list_is_exact(data) -> None:
    db, q, _ = data
    spec = SearchSpec.from_config({"index": "IVF16,Flat", "nprobe": 16, "train_size": 1000})
    _, approx = search(db, q, 5, spec)
    _, exact = knn_search(db, q, 5)
    assert np.mean(approx == exact) > 0.999  # equal up to the order of exact ties


def test_training_sample_is_seeded(data) -> None:
    db, q, _ = data
    runs = [search(db, q, 5, SearchSpec.from_config({"index": "IVF32,Flat", "nprobe": 1, "train_size": 2000}, seed=s))[1]
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"index": "IVF16,Fat"}, r"search.index='IVF16,Fat' is not a faiss index_factory string .*Fat"),
        ({"index": ""}, r"search.index='': give 'exact' or a faiss index_factory string"),
        ({"index": "IVF16,Flat", "train_size": 0}, r"search.train_size=0: must be a positive integer"),
        ({"nprobe": "many"}, r"search.nprobe='many': must be a positive integer or null"),
        ({"nprobes": 4}, r"search.nprobes: unknown key"),
    ],
)
def test_config_errors_name_the_key(data, cfg: dict, message: str) -> None:
    db, q, _ = data
    with pytest.raises(ValueError, match=message):
        search(db, q, 5, SearchSpec.from_config(cfg))


def test_too_small_training_sample_names_train_size(data) -> None:
    db, q, _ = data
    with pytest.raises(ValueError, match=r"cannot be trained on 10 rows \(search.train_size=10"):
        search(db, q, 5, SearchSpec.from_config({"index": "IVF64,Flat", "train_size": 10}))


def _split(num_db: int, num_q: int) -> PlaceSplit:
    rng = np.random.default_rng(0)
    return PlaceSplit(
        name="synthetic", split="test", root=Path("."), db_rel=[f"d{i}" for i in range(num_db)],
        q_rel=[f"q{i}" for i in range(num_q)], db_utm=rng.uniform(0, 200, (num_db, 2)),
        q_utm=rng.uniform(0, 200, (num_q, 2)),
    )


def test_skipped_database_images_are_struck_as_if_never_there(data) -> None:
    """retrieve searches every row and strikes the invalid ones: the lists of a search of
    the valid rows alone, mapped back to database indices."""
    db, q, _ = data
    db, q = np.asarray(db[:500]), q[:50]
    valid = np.random.default_rng(2).random(500) > 0.3
    _, topk, dist = retrieve(q, db, _split(500, 50), (1, 5, 20), db_valid=valid)
    kept = np.flatnonzero(valid)
    sub_dist, sub_idx = knn_search(db[kept], q, 20)
    np.testing.assert_array_equal(topk, kept[sub_idx])
    np.testing.assert_array_equal(dist, sub_dist)
    assert valid[topk].all()
