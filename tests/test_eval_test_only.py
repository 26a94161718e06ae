"""eval.py on an evaluation-only UTM folder dataset (only images/test/), as St Lucia, Nordland
and SVOX are distributed: the default PCA falls back to the test database, pca=false, PCA files
reused across datasets, the positive threshold key and the errors for missing splits.

Every query is a byte-identical copy of one database image, so any network ranks that twin
first; whether the twin counts as a hit depends only on the UTM offsets below. Recall@N is
then known by construction and is also recomputed by brute force from predictions.npz.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, compose_cfg
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from wakd.cli import run_job
from wakd.jobs import evaluate
from wakd.models.pca import PCAWhitening

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_DB = 24
SPACING = 30.0  # m between database places: neighbours of a twin lie beyond 25 m
HIT_OFFSET, MISS_OFFSET = 10.0, 45.0  # m north of the twin: inside / outside 25 m
TWINS = [0, 3, 6, 9, 12, 15, 18, 21]
HITS = {0, 3, 9, 15, 21}  # twins whose query lies HIT_OFFSET away; the others MISS_OFFSET
NS = (1, 5, 10, 20)
EAST0, NORTH0 = 500_000.0, 4_000_000.0
TINY = [
    "dataset=folder", "dataset.image_size=[64,86]",
    "model=resnet18", "model.weights=null", "model.net.num_clusters=8",  # D=256: 2,048-d
    "pca_dim=16", "num_workers=0", "batch_size=32",
]


def _write_place(path: Path, rng: np.random.Generator) -> None:
    """A distinct low-frequency colour pattern, so that descriptors of places differ clearly."""
    cells = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    Image.fromarray(cells).resize((86, 64), Image.BILINEAR).save(path, quality=95)


def _utm_name(east: float, north: float, i: int) -> str:
    return f"@{east:.2f}@{north:.2f}@17@S@{i:05d}@.jpg"


def _write_split(root: Path, split: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    db_dir, q_dir = root / "images" / split / "database", root / "images" / split / "queries"
    db_dir.mkdir(parents=True)
    q_dir.mkdir(parents=True)
    db_files = []
    for j in range(NUM_DB):
        db_files.append(db_dir / _utm_name(EAST0 + SPACING * j, NORTH0, j))
        _write_place(db_files[-1], rng)
    for i, j in enumerate(TWINS):
        offset = HIT_OFFSET if j in HITS else MISS_OFFSET
        shutil.copy(db_files[j], q_dir / _utm_name(EAST0 + SPACING * j, NORTH0 + offset, i))


@pytest.fixture(scope="module")
def test_only_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/images/test/{database,queries}/ and nothing else."""
    root = tmp_path_factory.mktemp("stlucia_like")
    _write_split(root, "test", seed=0)
    return root


def _eval(root: Path, run_dir: Path, *overrides: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    cfg = compose_cfg("eval", [*TINY, f"dataset.root={root}", *overrides], root, run_dir)
    evaluate.run(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    return results, np.load(run_dir / "predictions.npz", allow_pickle=False)


def _utm(rel_paths: np.ndarray) -> np.ndarray:
    """UTM from '@east@north@...' names, parsed here independently of the loader."""
    return np.array([[float(v) for v in Path(p).name.split("@")[1:3]] for p in rel_paths])


def _brute_force_recall(predictions: np.lib.npyio.NpzFile, radius: float) -> dict[int, float]:
    q_utm, db_utm = _utm(predictions["query_paths"]), _utm(predictions["database_paths"])
    within = np.linalg.norm(q_utm[:, None, :] - db_utm[None, :, :], axis=-1) <= radius  # [Q, N]
    topk = predictions["topk"]
    return {n: float(np.take_along_axis(within, topk[:, :n], axis=1).any(axis=1).mean()) for n in NS}


def _check(results: dict, predictions: np.lib.npyio.NpzFile, radius: float, expected_r1: float) -> None:
    recall = {int(n): v for n, v in results["recall"].items()}
    assert recall == pytest.approx(_brute_force_recall(predictions, radius))
    assert recall[1] == pytest.approx(expected_r1)
    assert results["pos_dist_thr"] == radius
    twins = np.array([predictions["database_paths"][j] for j in TWINS])
    assert list(predictions["database_paths"][predictions["topk"][:, 0]]) == list(twins)


def test_default_fits_pca_on_the_test_database(
    test_only_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, predictions = _eval(test_only_root, tmp_path / "run")
    out = capsys.readouterr().out
    fallback = [line for line in out.splitlines() if line.startswith("pca_fit=auto:")]
    assert len(fallback) == 1 and str(test_only_root / "images" / "train" / "database") in fallback[0]
    assert results["pca_fit"] == "database" and Path(results["pca_file"]).is_file()
    assert results["descriptor_dim"] == 16
    assert (results["num_database"], results["num_queries"]) == (NUM_DB, len(TWINS))
    _check(results, predictions, 25.0, len(HITS) / len(TWINS))


def test_pca_false(test_only_root: Path, tmp_path: Path) -> None:
    results, predictions = _eval(test_only_root, tmp_path / "run", "pca=false", "plots=false")
    assert results["pca_fit"] is None and results["descriptor_dim"] == 8 * 256
    _check(results, predictions, 25.0, len(HITS) / len(TWINS))


def test_threshold_key(test_only_root: Path, tmp_path: Path) -> None:
    """50 m makes every twin a positive (its neighbours stay beyond: sqrt(30² + 45²) > 50)."""
    results, predictions = _eval(
        test_only_root, tmp_path / "run", "pca=false", "plots=false", "dataset.pos_dist_thr=50"
    )
    _check(results, predictions, 50.0, 1.0)


def test_train_split_is_used_where_it_exists(tmp_path: Path) -> None:
    root = tmp_path / "with_train"
    _write_split(root, "test", seed=0)
    _write_split(root, "train", seed=1)
    results, predictions = _eval(root, tmp_path / "run", "plots=false")
    assert results["pca_fit"] == "train"
    _check(results, predictions, 25.0, len(HITS) / len(TWINS))


def test_pca_file_fitted_on_another_dataset_is_reused(test_only_root: Path, tmp_path: Path) -> None:
    first, _ = _eval(test_only_root, tmp_path / "first", "plots=false")
    other = tmp_path / "other_dataset"
    _write_split(other, "test", seed=0)
    results, predictions = _eval(other, tmp_path / "run", "plots=false", f"pca_fit={first['pca_file']}")
    assert results["pca_fit"] == results["pca_file"] == first["pca_file"]
    assert results["descriptor_dim"] == 16
    _check(results, predictions, 25.0, len(HITS) / len(TWINS))


def _error(cfg: DictConfig, capsys: pytest.CaptureFixture[str]) -> str:
    """Run as eval.py does: exit code 2 and one message, no traceback."""
    with pytest.raises(SystemExit) as info:
        run_job(evaluate.run, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pca_fit=train"], "PCA (pca_fit=train) needs {root}/images/train/database: pass pca_fit=database"),
        (["split=val"], "{root}/images/val/database does not exist"),
        (["pca_fit=nowhere.safetensors"], "pca_fit=nowhere.safetensors: no such PCA file"),
        (["pca=false", "dataset.pos_dist_thr=-5"], "pos_dist_thr=-5 (dataset.pos_dist_thr)"),
    ],
)
def test_errors_name_what_the_step_needs(
    overrides: list[str], message: str, test_only_root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = compose_cfg("eval", [*TINY, f"dataset.root={test_only_root}", *overrides], tmp_path, tmp_path / "run")
    err = _error(cfg, capsys)
    assert message.format(root=test_only_root) in err
    assert "synthcity" not in err


def test_pca_file_of_another_size_is_named(
    test_only_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pca_10d.safetensors"
    PCAWhitening(torch.zeros(10), torch.eye(10)[:4]).save(path)
    cfg = compose_cfg("eval", [*TINY, f"dataset.root={test_only_root}", f"pca_fit={path}"], tmp_path, tmp_path / "run")
    assert f"{path}: PCA expects 10-d descriptors, the network makes 2048-d ones" in _error(cfg, capsys)


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["dataset=pitts"], True),  # nothing named: the default location is empty
        (["dataset=pitts", "dataset.root={tmp}/mine"], False),
        (["dataset=pitts", "paths.data_dir={tmp}/data"], False),
    ],
)
def test_synthcity_is_suggested_only_where_no_location_was_named(
    overrides: list[str], hint: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))  # the default data dir: <tmp>/datasets/data
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=["model=rawpixels", *(o.format(tmp=tmp_path) for o in overrides)],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    err = _error(cfg, capsys)
    assert "does not exist" in err
    assert ("no data? try dataset=synthcity" in err) == hint
