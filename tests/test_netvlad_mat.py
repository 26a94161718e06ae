"""The NetVLAD dbStruct parser on the nine real files and on broken ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from scipy.spatial import cKDTree

from wakd.data import mat_summary
from wakd.data.netvlad_mat import DatasetFormatError, DbStruct, load_dbstruct, save_dbstruct

SPECS = Path(__file__).resolve().parents[2] / "shared" / "datasets-specs"
needs_specs = pytest.mark.skipif(
    not SPECS.is_dir(),
    reason=f"real NetVLAD .mat files not found at {SPECS} (shared/ beside the checkout)",
)

# (file, database images, queries) from shared/datasets-specs/README.md
REAL_FILES = [
    ("pitts30k_train", 10_000, 7_416),
    ("pitts30k_val", 10_000, 7_608),
    ("pitts30k_test", 10_000, 6_816),
    ("pitts250k_train", 91_464, 7_824),
    ("pitts250k_val", 78_648, 7_608),
    ("pitts250k_test", 83_952, 8_280),
    ("tokyo247", 75_984, 315),
    ("tokyoTM_train", 49_104, 7_277),
    ("tokyoTM_val", 49_056, 7_186),
]


@needs_specs
@pytest.mark.parametrize(("name", "num_db", "num_q"), REAL_FILES)
def test_real_file_counts_and_geometry(name: str, num_db: int, num_q: int) -> None:
    db = load_dbstruct(SPECS / f"{name}.mat")
    assert (db.num_db, db.num_queries) == (num_db, num_q)
    assert db.db_utm.shape == (num_db, 2) and db.q_utm.shape == (num_q, 2)
    assert db.pos_dist_thr == 25.0 and db.train_pos_radius == 10.0
    assert db.split == ("test" if name == "tokyo247" else name.split("_")[1])
    assert db.has_timestamps == name.startswith("tokyoTM")
    # UTM metres, not lat/lon or swapped axes: eastings ~ 10^5, northings ~ 10^6
    assert db.db_utm[:, 0].min() > 1e5 and db.db_utm[:, 1].min() > 1e6
    # README: every query has a database image within 25 m
    nearest, _ = cKDTree(db.db_utm).query(db.q_utm, k=1)
    assert nearest.max() <= 25.0


@needs_specs
def test_tokyo_tm_timestamps_are_yyyymm() -> None:
    db = load_dbstruct(SPECS / "tokyoTM_val.mat")
    for ts in (db.db_timestamps, db.q_timestamps):
        assert ts.dtype == np.int64
        years, months = ts // 100, ts % 100
        assert years.min() >= 2007 and years.max() <= 2015
        assert months.min() >= 1 and months.max() <= 12
    assert len(np.unique(db.db_timestamps)) > 1


@needs_specs
def test_mat_summary_pitts30k_train(capsys: pytest.CaptureFixture[str]) -> None:
    assert mat_summary.main([str(SPECS / "pitts30k_train.mat")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["split"] == "train"
    assert summary["num_db"] == 10_000 and summary["num_queries"] == 7_416
    assert summary["num_queries_with_train_positive"] == 7_320  # README
    assert summary["num_queries_with_eval_positive"] == 7_416
    assert summary["has_timestamps"] is False


def test_mat_summary_missing_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mat_summary.main([str(tmp_path / "nope.mat")]) == 2
    assert "nope.mat" in capsys.readouterr().err


def _tiny(timestamps: bool = False) -> DbStruct:
    rng = np.random.default_rng(0)
    return DbStruct(
        split="val",
        db_image_fns=["000/a.jpg", "000/b.jpg", "001/c.jpg"],
        db_utm=rng.uniform(0, 100, (3, 2)) + np.array([585_000, 4_477_000]),
        q_image_fns=["q/x.jpg", "q/y.jpg"],
        q_utm=rng.uniform(0, 100, (2, 2)) + np.array([585_000, 4_477_000]),
        db_timestamps=np.array([200909, 201306, 201407]) if timestamps else None,
        q_timestamps=np.array([201306, 200909]) if timestamps else None,
    )


@pytest.mark.parametrize("timestamps", [False, True])
def test_round_trip(tmp_path: Path, timestamps: bool) -> None:
    original = _tiny(timestamps)
    path = tmp_path / "sub" / "tiny.mat"
    save_dbstruct(original, path)
    loaded = load_dbstruct(path)
    assert loaded.split == "val"
    assert loaded.db_image_fns == original.db_image_fns
    assert loaded.q_image_fns == original.q_image_fns
    np.testing.assert_array_equal(loaded.db_utm, original.db_utm)
    np.testing.assert_array_equal(loaded.q_utm, original.q_utm)
    assert loaded.pos_dist_thr == 25.0 and loaded.train_pos_radius == 10.0
    assert loaded.has_timestamps == timestamps
    if timestamps:
        np.testing.assert_array_equal(loaded.db_timestamps, original.db_timestamps)
        np.testing.assert_array_equal(loaded.q_timestamps, original.q_timestamps)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.mat"]  # no temporary left behind


def test_round_trip_keeps_other_radii(tmp_path: Path) -> None:
    original = replace(_tiny(), pos_dist_thr=12.5, non_triv_pos_dist_sq_thr=400.0)
    save_dbstruct(original, tmp_path / "radii.mat")
    loaded = load_dbstruct(tmp_path / "radii.mat")
    assert (loaded.pos_dist_thr, loaded.train_pos_radius) == (12.5, 20.0)


def _raw_fields(db: DbStruct) -> dict[str, object]:
    return {
        "whichSet": db.split,
        "dbImageFns": np.array(db.db_image_fns, dtype=object).reshape(-1, 1),
        "utmDb": db.db_utm.T,
        "qImageFns": np.array(db.q_image_fns, dtype=object).reshape(-1, 1),
        "utmQ": db.q_utm.T,
        "posDistThr": 25,
        "posDistSqThr": 625,
        "nonTrivPosDistSqThr": 100,
    }


def test_missing_field_is_named(tmp_path: Path) -> None:
    fields = _raw_fields(_tiny())
    del fields["utmQ"]
    scipy.io.savemat(tmp_path / "bad.mat", {"dbStruct": fields})
    with pytest.raises(DatasetFormatError, match=r"bad\.mat.*utmQ"):
        load_dbstruct(tmp_path / "bad.mat")


def test_wrong_utm_shape_is_named(tmp_path: Path) -> None:
    fields = _raw_fields(_tiny())
    fields["utmDb"] = np.zeros((3, 3))  # 3 rows instead of easting/northing
    scipy.io.savemat(tmp_path / "bad.mat", {"dbStruct": fields})
    with pytest.raises(DatasetFormatError, match=r"bad\.mat.*'utmDb'.*\(2, 3\)"):
        load_dbstruct(tmp_path / "bad.mat")


def test_not_a_mat_and_no_dbstruct(tmp_path: Path) -> None:
    (tmp_path / "text.mat").write_text("hello")
    with pytest.raises(DatasetFormatError, match=r"text\.mat"):
        load_dbstruct(tmp_path / "text.mat")
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(DatasetFormatError, match=r"other\.mat.*dbStruct"):
        load_dbstruct(tmp_path / "other.mat")
    with pytest.raises(FileNotFoundError, match=r"absent\.mat"):
        load_dbstruct(tmp_path / "absent.mat")
