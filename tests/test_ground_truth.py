"""Radius search against brute-force numpy distances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wakd.data.ground_truth import radius_positives
from wakd.data.netvlad_mat import load_dbstruct

SPECS = Path(__file__).resolve().parents[2] / "shared" / "datasets-specs"


def brute_force(db_utm, q_utm, radius, db_ts=None, q_ts=None) -> list[np.ndarray]:
    dist = np.sqrt(((q_utm[:, None, :] - db_utm[None, :, :]) ** 2).sum(-1))  # [M, N]
    out = []
    for i, row in enumerate(dist):
        keep = row <= radius
        if db_ts is not None:
            keep &= db_ts != q_ts[i]
        idx = np.flatnonzero(keep)
        out.append(idx[np.lexsort((idx, row[idx]))])
    return out


def assert_same(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, e)


def test_random_points_with_ties_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    # integer grid: many equal distances and points exactly on the radius
    db = rng.integers(0, 60, (400, 2)).astype(np.float64)
    q = rng.integers(0, 60, (150, 2)).astype(np.float64)
    for radius in (5.0, 10.0, 25.0):
        got = radius_positives(db, q, radius)
        assert_same(got, brute_force(db, q, radius))
    assert any(len(p) > 1 for p in got)


def test_sorted_by_distance_and_boundary_included() -> None:
    db = np.array([[6.0, 8.0], [1.0, 0.0], [0.0, 10.5], [3.0, 4.0], [-3.0, 4.0]])
    (pos,) = radius_positives(db, np.zeros((1, 2)), 10.0)
    # distances 10 (on the boundary), 1, 10.5 (outside), 5, 5 (tie: lower index first)
    np.testing.assert_array_equal(pos, [1, 3, 4, 0])


def test_time_rule_drops_same_timestamp() -> None:
    rng = np.random.default_rng(2)
    db = rng.uniform(0, 50, (300, 2))
    q = rng.uniform(0, 50, (80, 2))
    db_ts = rng.choice([200909, 201306, 201407], 300)
    q_ts = rng.choice([200909, 201306, 201407], 80)
    got = radius_positives(db, q, 10.0, db_ts, q_ts)
    assert_same(got, brute_force(db, q, 10.0, db_ts, q_ts))
    without_rule = radius_positives(db, q, 10.0)
    assert sum(map(len, got)) < sum(map(len, without_rule))
    for i, pos in enumerate(got):
        assert not np.any(db_ts[pos] == q_ts[i])


def test_empty_database_and_bad_input() -> None:
    got = radius_positives(np.zeros((0, 2)), np.zeros((3, 2)), 10.0)
    assert len(got) == 3 and all(p.size == 0 and p.dtype == np.int64 for p in got)
    with pytest.raises(ValueError, match="db_utm"):
        radius_positives(np.zeros((2, 5)), np.zeros((3, 2)), 10.0)
    with pytest.raises(ValueError, match="both"):
        radius_positives(np.zeros((2, 2)), np.zeros((3, 2)), 10.0, db_timestamps=np.zeros(2))
    with pytest.raises(ValueError, match="q_timestamps"):
        radius_positives(np.zeros((2, 2)), np.zeros((3, 2)), 10.0, np.zeros(2), np.zeros(5))


@pytest.mark.skipif(not SPECS.is_dir(), reason=f"real NetVLAD .mat files not found at {SPECS}")
@pytest.mark.parametrize("name", ["pitts30k_train", "tokyoTM_val"])
def test_real_file_matches_brute_force(name: str) -> None:
    db = load_dbstruct(SPECS / f"{name}.mat")
    some = np.random.default_rng(0).choice(db.num_queries, 200, replace=False)
    q_ts = None if db.q_timestamps is None else db.q_timestamps[some]
    for radius in (10.0, 25.0):
        got = radius_positives(db.db_utm, db.q_utm[some], radius, db.db_timestamps, q_ts)
        assert_same(got, brute_force(db.db_utm, db.q_utm[some], radius, db.db_timestamps, q_ts))
    if name == "pitts30k_train":
        all_train = radius_positives(db.db_utm, db.q_utm, db.train_pos_radius)
        assert sum(len(p) > 0 for p in all_train) == 7_320  # README, docs/method.md
