"""The synthetic city: determinism, files and ground truth, renderer, place classification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wakd.data.netvlad_mat import load_dbstruct
from wakd.synth.synthcity import MANIFEST, City, RenderedPlaces, generate_city, main

SPLITS = ("train", "val", "test")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    t0 = time.perf_counter()
    root = generate_city(tmp_path_factory.mktemp("a"), "tiny", seed=0, progress=False)
    return root, time.perf_counter() - t0


@pytest.fixture(scope="module")
def city() -> City:
    return City("tiny", seed=0)


def test_tiny_generates_quickly_in_the_contract_layout(tiny):
    root, seconds = tiny
    assert seconds < 10.0
    assert root.name == "raw" and root.parent.name == "synthcity"
    manifest = json.loads((root / MANIFEST).read_text())
    assert (manifest["preset"], manifest["seed"]) == ("tiny", 0)
    for split in SPLITS:
        db = load_dbstruct(root / f"synthcity_{split}.mat")
        assert db.split == split
        assert manifest["counts"][split] == {"db": db.num_db, "queries": db.num_queries}
        assert all((root / "images" / fn).is_file() for fn in db.db_image_fns)
        assert all((root / "queries" / fn).is_file() for fn in db.q_image_fns)
        assert db.db_image_fns[1].endswith("_yaw1.jpg") and db.q_image_fns[0].endswith("_q.jpg")
        assert len(set(db.db_image_fns)) == db.num_db
    # Splits share the folders, so names must be unique across splits.
    counts = manifest["counts"]
    assert len(list((root / "images").rglob("*.jpg"))) == sum(counts[s]["db"] for s in SPLITS)
    assert len(list((root / "queries").rglob("*.jpg"))) == sum(counts[s]["queries"] for s in SPLITS)
    assert load_dbstruct(root / "synthcity_train.mat").q_image_fns[0] == "000/000000_q.jpg"


def test_ground_truth_by_construction(tiny):
    root, _ = tiny
    xs = []
    for split in SPLITS:
        db = load_dbstruct(root / f"synthcity_{split}.mat")
        d = np.linalg.norm(db.q_utm[:, None, :] - db.db_utm[None, :, :], axis=2).min(axis=1)
        assert (d <= db.pos_dist_thr).all()
        if split == "train":
            assert (d <= db.train_pos_radius).all()
        xs.append((db.db_utm[:, 0].min(), db.db_utm[:, 0].max()))
    # Splits are disjoint west-to-east bands.
    assert xs[0][1] < xs[1][0] and xs[1][1] < xs[2][0]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    root, _ = tiny
    again = generate_city(tmp_path / "b", "tiny", seed=0, progress=False)
    other = generate_city(tmp_path / "c", "tiny", seed=1, progress=False)
    assert _digest(again) == _digest(root)
    for split in SPLITS:
        a, b = (
            load_dbstruct(root / f"synthcity_{split}.mat"),
            load_dbstruct(again / f"synthcity_{split}.mat"),
        )
        assert a.db_image_fns == b.db_image_fns and a.q_image_fns == b.q_image_fns
        np.testing.assert_array_equal(a.db_utm, b.db_utm)
        np.testing.assert_array_equal(a.q_utm, b.q_utm)
    c = load_dbstruct(other / "synthcity_train.mat")
    a = load_dbstruct(root / "synthcity_train.mat")
    assert c.db_utm.shape != a.db_utm.shape or not np.array_equal(c.db_utm, a.db_utm)
    shared = set(_digest(root)) & set(_digest(other))
    assert shared and all(_digest(root)[k] != _digest(other)[k] for k in list(shared)[:20])


def test_regeneration_is_skipped_unless_preset_or_seed_changes(tmp_path, capsys):
    root = generate_city(tmp_path, "tiny", seed=3, progress=False)
    mat = root / "synthcity_val.mat"
    stamp = mat.stat().st_mtime_ns
    main(["--out", str(tmp_path), "--preset", "tiny", "--seed", "3", "--quiet"])
    assert mat.stat().st_mtime_ns == stamp
    assert "tiny, seed 3" in capsys.readouterr().out
    generate_city(tmp_path, "tiny", seed=4, progress=False)
    assert mat.stat().st_mtime_ns != stamp
    assert json.loads((root / MANIFEST).read_text())["seed"] == 4
    generate_city(tmp_path, "tiny", seed=5, progress=False)
    train = load_dbstruct(root / "synthcity_train.mat")
    n_db = sum(load_dbstruct(root / f"synthcity_{s}.mat").num_db for s in SPLITS)
    assert len(list((root / "images").rglob("*.jpg"))) == n_db  # no stale files left
    assert train.num_db > 0


def test_render_shape_dtype_and_determinism(city):
    xy, axis = city.places("train")
    heading = city.view_headings(axis[0])[0]
    img = city.render(*xy[0], heading)
    assert img.shape == (*city.config.image_size, 3) and img.dtype == np.uint8
    assert city.render(*xy[0], heading, size=(48, 40), fov_deg=60).shape == (48, 40, 3)
    assert img.std() > 10  # not a blank frame
    np.testing.assert_array_equal(img, city.render(*xy[0], heading))
    q1 = city.render(*xy[0], heading, rng=np.random.default_rng(7), query_like=True)
    q2 = city.render(*xy[0], heading, rng=np.random.default_rng(7), query_like=True)
    np.testing.assert_array_equal(q1, q2)
    assert np.abs(q1.astype(int) - img).mean() > 3  # appearance change happened


def test_nearby_view_is_more_similar_than_another_street(city):
    xy, axis = city.places("train")
    rng = np.random.default_rng(0)
    near, far = [], []
    for i in rng.choice(len(xy), 12, replace=False):
        heading = city.view_headings(axis[i])[int(rng.integers(4))]
        along = np.array([np.sin(np.radians(axis[i])), np.cos(np.radians(axis[i]))])
        ref = city.render(*xy[i], heading).astype(float)
        shifted = city.render(*(xy[i] + 3.0 * along), heading).astype(float)
        dist = np.linalg.norm(xy - xy[i], axis=1)
        j = int(rng.choice(np.nonzero(dist > 60)[0]))
        other = city.render(*xy[j], city.view_headings(axis[j])[0]).astype(float)
        near.append(np.abs(ref - shifted).mean())
        far.append(np.abs(ref - other).mean())
    assert np.mean(near) < 0.7 * np.mean(far)


def test_rendered_places_labels_and_fresh_views(tiny, city):
    ds = RenderedPlaces(tiny[0], split="train", seed=0)  # rebuilt from the manifest
    assert ds.num_classes == ds.num_headings * len(city.train_cells()[0]) > 10
    it = iter(ds)
    samples = [next(it) for _ in range(6)]
    for img, label in samples:
        assert img.dtype == torch.float32 and img.shape == (3, *city.config.image_size)
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert 0 <= label < ds.num_classes
    assert not torch.equal(samples[0][0], samples[1][0])
    # Same cell rendered twice gives two different views.
    rng = np.random.default_rng(1)
    a = ds.sample(np.random.default_rng(rng.integers(1 << 30)))
    b = ds.sample(np.random.default_rng(rng.integers(1 << 30)))
    assert not torch.equal(a[0], b[0])


def test_rendered_places_workers_draw_distinct_streams(city):
    ds = RenderedPlaces(city, size=(32, 40), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    it = iter(loader)
    b0, b1 = next(it), next(it)  # one batch from each worker
    assert not torch.equal(b0[0], b1[0])
    assert b0[0].shape == (4, 3, 32, 40)


def test_train_cells_cover_training_streets(city):
    centres, axes, halves = city.train_cells(cell_size=10.0)
    assert centres.shape == (len(axes), 2) and len(halves) == len(axes)
    assert ((halves > 2.5) & (halves < 10.0)).all()
    # Cells do not overlap: centres at least a cell apart-ish along the streets.
    d = np.linalg.norm(centres[:, None] - centres[None], axis=2) + np.eye(len(centres)) * 1e9
    assert d.min() > 5.0


def test_bench_preset_is_the_demo_city_with_600_test_queries():
    """bench/other_teacher.py's city: the demo's streets and views, twice the test queries."""
    demo, bench = City("demo"), City("bench")
    assert bench.config.queries == (1000, 300, 600)
    assert dataclasses.replace(demo.config, queries=bench.config.queries) == bench.config
    for split in ("train", "val", "test"):
        for ours, theirs in zip(bench.places(split), demo.places(split), strict=True):
            np.testing.assert_array_equal(ours, theirs)
