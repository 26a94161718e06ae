"""A mining round's distances: fp32 by the norm formula within a proven bound, and the
tuples of exact distances all the same (near ties re-scored)."""

from __future__ import annotations

import numpy as np
import pytest

from wakd.data.datasets import PlaceSplit
from wakd.data.tuple_miner import TupleMiner
from wakd.knn import (
    cross_pair_sq_distances,
    formula_error_bound,
    k_smallest_per_list,
    knn_graph,
    pair_sq_distances,
)


def _exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).sum(-1)


def _hard_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """fp16 rows where the formula cancels: large norms, near-duplicates, exact duplicates."""
    base = rng.normal(size=(1, dim)) * 8.0
    x = (base + 1e-2 * rng.normal(size=(n, dim))).astype(np.float16)
    x[n // 2 :] = rng.normal(size=(n - n // 2, dim)).astype(np.float16)
    x[1] = x[0]
    return x


def test_cross_pair_distances_within_the_formula_bound() -> None:
    rng = np.random.default_rng(1)
    x = _hard_rows(rng, 60, 512)
    q, db = x[:9], x[9:]
    rows, cols = rng.integers(0, 9, 3000), rng.integers(0, 51, 3000)
    rows[0], cols[0] = 1, 0  # q[1] is not db[0]; make one exact duplicate pair:
    db[0] = q[1]
    got = cross_pair_sq_distances(q, db, rows, cols, chunk=7)  # several chunks
    want = _exact(q[rows], db[cols])
    sq = np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64))
    bound = formula_error_bound(512, sq[:9].max() + sq[9:].max())
    err = np.abs(got - want)
    assert err.max() <= bound
    assert err.max() > 0  # the formula does round here


@pytest.mark.parametrize("stored", [np.float16, np.float32])
def test_exact_pair_distances_of_fp16_and_fp32_rows(stored: type) -> None:
    """The re-scoring's direct float64 differences, gathered per distinct row (fp16) or per pair."""
    rng = np.random.default_rng(3)
    x = _hard_rows(rng, 40, 96).astype(stored)
    a, b = rng.integers(0, 40, 500), rng.integers(0, 40, 500)
    got = pair_sq_distances(x, a, b, chunk=64, dtype=np.float64)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _exact(x[a], x[b]), rtol=1e-14, atol=0)


def test_knn_graph_pair_distances_within_the_bound_across_blocks() -> None:
    rng = np.random.default_rng(2)
    x = _hard_rows(rng, 50, 64)
    a, b = rng.integers(0, 50, 700), rng.integers(0, 50, 700)
    graph = knn_graph(x, 4, q_chunk=7, db_chunk=11, pairs=(a, b))  # blocks of 7 rows
    sq = np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64))
    assert np.abs(graph.pair_distances - _exact(x[a], x[b])).max() <= formula_error_bound(64, 2 * sq.max())
    assert knn_graph(x, 4).pair_distances is None


@pytest.mark.parametrize("k", [1, 3, 8])
def test_k_smallest_per_list_orders_as_exact_distances(k: int) -> None:
    """Lists of near ties (gaps under the bound) and exact ties: the exact order, ties by position."""
    rng = np.random.default_rng(k)
    bound = 1e-3
    lengths = rng.integers(1, 30, 200)
    exact = np.round(rng.uniform(0, 0.02, lengths.sum()), 4)  # many exact ties and gaps < bound
    approx = (exact + rng.uniform(-bound, bound, len(exact))).astype(np.float32)
    approx = np.clip(approx, exact - bound, exact + bound)  # the fp32 rounding stays in the bound
    rescored = []

    def exact_at(positions: np.ndarray) -> np.ndarray:
        rescored.append(len(positions))
        return exact[positions]

    got, dist = k_smallest_per_list(approx, bound, lengths, k, exact_at)
    starts = np.cumsum(lengths) - lengths
    want = np.concatenate(
        [s + np.argsort(exact[s : s + n], kind="stable")[:k] for s, n in zip(starts, lengths, strict=True)]
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(dist, exact[want], atol=bound)
    assert sum(rescored) < len(exact)  # only the doubtful pairs, not all of them


def _line_split() -> PlaceSplit:
    """6 queries 100 m apart, each with 6 database images within 5 m; 40 far images."""
    q_x = np.arange(6) * 100.0
    db_x = np.concatenate([np.repeat(q_x, 6) + np.tile(np.arange(6.0), 6), 5000.0 + 40.0 * np.arange(40)])
    return PlaceSplit(
        name="toy", split="train", root=".",
        db_rel=[f"db{i}.jpg" for i in range(len(db_x))], q_rel=[f"q{i}.jpg" for i in range(6)],
        db_utm=np.stack([db_x, np.zeros_like(db_x)], 1), q_utm=np.stack([q_x, np.zeros(6)], 1),
    )  # fmt: skip


@pytest.mark.parametrize("copy_bytes", [1 << 30, 0], ids=["fp32-copy", "as-stored"])
@pytest.mark.parametrize("rerank", [False, True])
def test_mined_tuples_are_those_of_exact_distances(
    rerank: bool, copy_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Database images that differ by a tiny fp16 value (distances to a query differ by
    less than the fp32 formula's error), many exact duplicates: the hard positive, the pools
    and the hardest negatives are those of float64 distances, ties to the lower index, with
    the round's descriptors copied to fp32 or kept as stored (fp16, as for large sets)."""
    split = _line_split()
    rng = np.random.default_rng(0)
    dim = 32
    q_desc = rng.normal(size=(6, dim)).astype(np.float16)
    center = 4.0 * rng.normal(size=dim)
    db_desc = np.tile(center, (76, 1))
    # The first coordinate a few steps of 2^-20 (exact in fp16): distances ~1e-6 apart.
    db_desc[:, 0] = np.arange(76) % 5 * 2.0**-20
    db_desc = db_desc.astype(np.float16)
    monkeypatch.setattr("wakd.data.tuple_miner.FP32_COPY_BYTES", copy_bytes)  # large sets stay fp16
    miner = TupleMiner(split, pos_num=3, neg_num=4, pos_pool=5, neg_pool=100, rerank_k1=4)
    tuples = miner.mine(np.arange(6), q_desc, db_desc, np.random.default_rng(0), rerank=rerank)

    exact = _exact(q_desc[:, None], db_desc[None])  # [6, 76]
    approx = cross_pair_sq_distances(q_desc, db_desc, np.repeat(np.arange(6), 76), np.tile(np.arange(76), 6))
    assert (np.argsort(approx.reshape(6, 76), axis=1, kind="stable")
            != np.argsort(exact, axis=1, kind="stable")).any()  # fmt: skip  # fp32 alone would err
    for t in tuples:
        positives = miner.positives[t.query]
        pool = positives[np.argsort(exact[t.query, positives], kind="stable")][:5]
        assert t.hard_positive == pool[0]
        if not rerank:
            np.testing.assert_array_equal(t.positives, pool[:3])
        else:
            assert set(t.positives) <= set(pool)
        negatives = np.setdiff1d(np.arange(76), miner.non_negatives[t.query])
        want = negatives[np.argsort(exact[t.query, negatives], kind="stable")[:4]]
        np.testing.assert_array_equal(t.negatives, want)


def test_knn_graph_gpu_branch_agrees_with_the_cpu_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch (two searches, pair distances by the fp32 GEMM), its tiles searched by
    faiss on the CPU: the same graph as the CPU pass, pair distances within the bound."""
    import faiss

    import wakd.knn as knn

    rng = np.random.default_rng(4)
    x = rng.normal(size=(90, 24)).astype(np.float16)
    a, b = rng.integers(0, 30, 400), rng.integers(30, 90, 400)
    cpu = knn_graph(x, 5, pairs=(a, b), use_gpu=False)
    monkeypatch.setattr(knn, "_resolve_gpu", lambda use_gpu: bool(use_gpu))
    monkeypatch.setattr(knn, "_tile_search", lambda use_gpu, metric: lambda xq, xb, k: faiss.knn(xq, xb, k, metric=metric))
    gpu = knn_graph(x, 5, pairs=(a, b), use_gpu=True, q_chunk=16, db_chunk=32)
    np.testing.assert_array_equal(gpu.indices, cpu.indices)
    np.testing.assert_allclose(gpu.distances, cpu.distances, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gpu.row_max, cpu.row_max, rtol=1e-5)
    sq = np.einsum("nd,nd->n", x.astype(np.float64), x.astype(np.float64))
    assert np.abs(gpu.pair_distances - _exact(x[a], x[b])).max() <= formula_error_bound(24, 2 * sq.max())
