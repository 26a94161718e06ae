"""MSLS's native layout and protocol, the dataset checker, the .mat -> UTM folder converter,
and the errors bad input gets (issue 35)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wakd.data import check, convert
from wakd.data.datasets import load_split
from wakd.data.ground_truth import radius_positives
from wakd.data.msls_miniature import write_miniature
from wakd.data.netvlad_mat import DatasetFormatError, DbStruct, save_dbstruct
from wakd.data.utm_names import format_utm_name, parse_utm_name

E0, N0 = 585_000.0, 4_477_000.0


@pytest.fixture()
def msls_root(tmp_path: Path) -> tuple[Path, dict[str, dict[str, int]]]:
    return tmp_path / "msls", write_miniature(tmp_path / "msls", num_database=24, num_queries=12)


def _jpeg(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 90, 200)).save(path, format="JPEG")


def test_msls_val_keeps_the_official_images(msls_root) -> None:
    root, expected = msls_root
    split = load_split("msls", root, "val")
    assert split.num_db == sum(c["database"] for c in expected.values())
    assert split.num_queries == sum(c["queries"] for c in expected.values())
    # panoramas (every 5th) and images outside subtask 'all' (every 7th) are out
    kept = {Path(r).stem for r in split.q_rel + split.db_rel}
    assert "cphd00004" not in kept and "cphd00006" not in kept and "cphd00005" in kept
    assert [r.split("/")[1] for r in split.q_rel] == ["cph"] * 6 + ["sf"] * 6  # cities in order
    assert all(len(p) > 0 for p in split.eval_positives())  # only queries with a positive
    assert split.eval_radius == 25.0 and all(os.path.isfile(p) for p in split.q_paths + split.db_paths)


def test_msls_positives_stay_in_their_city() -> None:
    db = np.array([[0.0, 0.0], [0.0, 0.0]])  # the same coordinates in two cities (two UTM zones)
    q = np.array([[1.0, 0.0]])
    assert radius_positives(db, q, 25.0)[0].tolist() == [0, 1]
    assert radius_positives(db, q, 25.0, db_regions=np.array([0, 1]), q_regions=np.array([1]))[0].tolist() == [1]


def _rewrite_csv(path: Path, line: int, column: str, value: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[line - 1][rows[0].index(column)] = value
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_msls_malformed_csv_names_file_and_line(msls_root) -> None:
    root, _ = msls_root
    post = root / "train_val/sf/database/postprocessed.csv"
    _rewrite_csv(post, 4, "easting", "east")
    with pytest.raises(DatasetFormatError, match=r"sf/database/postprocessed\.csv line 4: easting = 'east' is not a number"):
        load_split("msls", root, "val")
    raw = root / "train_val/cph/query/raw.csv"
    with open(raw, "a") as f:
        f.write("99,extra,1.0\n")
    with pytest.raises(DatasetFormatError, match=r"cph/query/raw\.csv line 14: 3 fields, the header has 7"):
        load_split("msls", root, "val")


def test_msls_rows_must_describe_the_same_images(msls_root) -> None:
    root, _ = msls_root
    _rewrite_csv(root / "train_val/cph/query/raw.csv", 3, "key", "someone_else")
    with pytest.raises(DatasetFormatError, match=r"cph/query/raw\.csv line 3: key 'someone_else'"):
        load_split("msls", root, "val")
    _rewrite_csv(root / "train_val/cph/database/seq_info.csv", 2, "key", "../../escape")
    with pytest.raises(DatasetFormatError, match=r"cph/database/seq_info\.csv line 2: key '\.\./\.\./escape' is not an image name"):
        load_split("msls", root, "val")


def test_msls_missing_city_and_column(msls_root) -> None:
    root, _ = msls_root
    (root / "train_val/sf").rename(root / "train_val/sf_moved")
    with pytest.raises(FileNotFoundError, match=r"MSLS city 'sf' not found: .*train_val/sf does not exist .*cph, sf_moved"):
        load_split("msls", root, "val")
    (root / "train_val/sf_moved").rename(root / "train_val/sf")
    sub = root / "train_val/sf/query/subtask_index.csv"
    sub.write_text(sub.read_text().replace(",all,", ",every,", 1))
    with pytest.raises(DatasetFormatError, match=r"sf/query/subtask_index\.csv line 1: no column 'all'"):
        load_split("msls", root, "val")
    with pytest.raises(ValueError, match="MSLS split 'test'"):
        load_split("msls", root, "test")


def test_utm_names_round_trip_and_zones(tmp_path: Path) -> None:
    name = format_utm_name(585000.25, 4477000.5, "17T", pano_id="abc", heading=90)
    assert name.count("@") == 15 and name.endswith("@.jpg")
    parsed = parse_utm_name(tmp_path / name)
    assert (parsed.east, parsed.north, parsed.zone) == (585000.25, 4477000.5, "17T")
    assert parse_utm_name("@1@2@note@.jpg").zone is None  # short names carry no zone
    with pytest.raises(ValueError, match="zone"):
        format_utm_name(1.0, 2.0, "T17")


def test_folder_zone_mismatch_and_missing_coordinates(tmp_path: Path) -> None:
    _jpeg(tmp_path / "images/test/database" / format_utm_name(E0, N0, "17T"))
    _jpeg(tmp_path / "images/test/queries" / format_utm_name(E0 + 1, N0, "17T"))
    assert load_split("folder", tmp_path, "test").num_db == 1
    odd = tmp_path / "images/test/queries" / format_utm_name(E0 + 2, N0, "18T")
    _jpeg(odd)
    with pytest.raises(DatasetFormatError, match=rf"{odd.name}: UTM zone 18T, but .* is in zone 17T"):
        load_split("folder", tmp_path, "test")
    odd.unlink()
    _jpeg(tmp_path / "images/test/queries/IMG_0001.jpg")
    with pytest.raises(DatasetFormatError, match=r"IMG_0001\.jpg: name does not start with '@<utm_east>@<utm_north>@'"):
        load_split("folder", tmp_path, "test")


def _mat_dataset(root: Path) -> DbStruct:
    """A synthcity-layout split: 6 database images 10 m apart, 4 queries (the last far off)."""
    db = DbStruct(
        split="test",
        db_image_fns=[f"000/{i:06d}_yaw{i % 2}.jpg" for i in range(6)],
        db_utm=np.array([[E0 + 10.0 * i, N0] for i in range(6)]),
        q_image_fns=[f"000/{i:06d}_q.jpg" for i in range(4)],
        q_utm=np.array([[E0 + 12.0 * i + 2, N0 + 1] for i in range(3)] + [[E0, N0 + 500]]),
    )
    save_dbstruct(db, root / "synthcity_test.mat")
    for i, fn in enumerate(db.db_image_fns):
        _jpeg(root / "images" / fn, 20 * i)
    for i, fn in enumerate(db.q_image_fns):
        _jpeg(root / "queries" / fn, 20 * i + 5)
    return db


def test_convert_links_and_keeps_ground_truth(tmp_path: Path) -> None:
    src, dst = tmp_path / "raw", tmp_path / "folder"
    _mat_dataset(src)
    assert convert.main([str(src), str(dst), "--zone", "17T"]) == 0
    links = sorted((dst / "images/test/database").iterdir())
    assert len(links) == 6 and all(p.is_symlink() for p in links)
    assert parse_utm_name(links[0]).zone == "17T"
    before, after = load_split("synthcity", src, "test"), load_split("folder", dst, "test")

    def positive_files(split):  # query file -> its positives' files, independent of list order
        return {
            os.path.realpath(split.q_paths[q]): sorted(os.path.realpath(split.db_paths[j]) for j in pos)
            for q, pos in enumerate(split.eval_positives())
        }

    assert positive_files(before) == positive_files(after)
    assert convert.main([str(src), str(dst)]) == 1  # never overwrites a converted split


def test_check_reports_problems_and_exit_status(tmp_path: Path, capsys) -> None:
    src, dst = tmp_path / "raw", tmp_path / "folder"
    _mat_dataset(src)
    assert check.main([str(src), "--decode", "all"]) == 0
    out = capsys.readouterr().out
    assert "synthcity | test  | 4       | 6" in out and "1 queries have no database image within 25 m" in out
    convert.main([str(src), str(dst)])
    capsys.readouterr()
    assert check.main([str(dst)]) == 0
    (src / "images/000/000003_yaw1.jpg").write_bytes(b"not a jpeg")
    (src / "queries/000/000001_q.jpg").unlink()
    assert check.main([str(src), "--decode", "all"]) == 1
    err = capsys.readouterr().err
    assert "1 of 10 images missing" in err and "000001_q.jpg" in err
    assert "1 of 9 images decoded fail" in err and "000003_yaw1.jpg" in err
    assert check.main([str(tmp_path / "nothing_here")]) == 2


def test_check_msls_and_query_database_overlap(msls_root, tmp_path: Path, capsys) -> None:
    root, _ = msls_root
    assert check.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "msls    | val   | 12      | 34" in out
    assert "6 flagged queries have no positive within 25 m and are left out" in out and "cphq00003.jpg" in out
    folder = tmp_path / "overlap"
    name = format_utm_name(E0, N0, "17T")
    _jpeg(folder / "images/test/database" / name)
    (folder / "images/test/queries").mkdir(parents=True)
    os.symlink(folder / "images/test/database" / name, folder / "images/test/queries" / name)
    assert check.main([str(folder)]) == 1
    assert "1 files are both query and database image" in capsys.readouterr().err


def test_eval_msls_writes_its_protocol(msls_root, tmp_path: Path) -> None:
    """eval.py dataset=msls on the miniature: the official queries, the protocol named in results.json."""
    import json

    from conftest import compose_cfg

    from wakd.jobs import evaluate

    root, expected = msls_root
    overrides = ["dataset=msls", f"dataset.root={root}", "dataset.image_size=[12,16]", "model=rawpixels",
                 "model.net.size=[6,8]", "num_workers=0", "plots=false"]
    cfg = compose_cfg("eval", overrides, tmp_path, tmp_path / "run")
    evaluate.run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["dataset"], results["protocol"], results["split"]) == ("msls", "msls-val", "val")
    assert results["num_queries"] == sum(c["queries"] for c in expected.values())
    assert results["queries_without_positive"] == 0
    # no training cities here: PCA (for NetVLAD models) falls back to the evaluated database
    assert evaluate.resolve_pca_fit(cfg) == "database"
    folder = compose_cfg("eval", ["dataset=msls_folder"], tmp_path, tmp_path / "run2")
    assert (folder.dataset.name, folder.dataset.protocol, folder.dataset.kind) == ("msls_folder", "msls-val-folder", "folder")


def test_convert_tokyo_tm_keeps_zone_and_capture_month(tmp_path: Path) -> None:
    src, dst = tmp_path / "raw", tmp_path / "folder"
    db = DbStruct(
        split="val",
        db_image_fns=["a/db0.jpg", "a/db1.jpg"],
        db_utm=np.array([[380_000.0, 3_946_000.0], [380_005.0, 3_946_000.0]]),
        q_image_fns=["a/q0.jpg"],
        q_utm=np.array([[380_001.0, 3_946_001.0]]),
        db_timestamps=np.array([200912, 201103]),
        q_timestamps=np.array([200912]),
    )
    save_dbstruct(db, src / "tokyoTM_val.mat")
    for fn in db.db_image_fns + db.q_image_fns:
        _jpeg(src / "tokyoTM/images" / fn)
    assert convert.main([str(src), str(dst)]) == 0
    names = sorted(p.name for p in (dst / "images/val/database").iterdir())
    assert [[*n.split("@")[3:5], n.split("@")[13]] for n in names] == [["54", "S", "200912"], ["54", "S", "201103"]]
    assert load_split("folder", dst, "val").num_db == 2
