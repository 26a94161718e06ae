"""eval.py end to end on the tiny synthetic city and on a UTM folder-format dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose_cfg

from wakd.data.datasets import load_split
from wakd.eval.recall import recall_at_n
from wakd.jobs import evaluate

TINY_CITY = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny"]
TINY_EVAL = [
    *TINY_CITY,
    "pca_dim=16",
    "num_workers=0",
    "batch_size=32",
]
RESNET = ["model=resnet18", "model.weights=null", "model.net.num_clusters=8"]
OUTPUTS = ("results.json", "predictions.npz", "retrievals.png", "recall_at_n.png", "attention.png")


def _check_outputs(run_dir: Path, root: Path) -> dict:
    for name in OUTPUTS:
        assert (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    predictions = np.load(run_dir / "predictions.npz", allow_pickle=False)
    split = load_split(results["dataset"] if results["dataset"] != "synthcity" else "synthcity", root, results["split"])
    assert results["num_queries"] == split.num_queries == len(predictions["query_paths"])
    assert results["num_database"] == split.num_db == len(predictions["database_paths"])
    assert list(predictions["database_paths"]) == split.db_rel
    recomputed = recall_at_n(predictions["topk"], split.eval_positives(), (1, 5, 10, 20))
    assert {int(n): v for n, v in results["recall"].items()} == pytest.approx(recomputed)
    assert predictions["topk"].dtype == np.int64 and predictions["topk"].shape == (split.num_queries, 20)
    assert np.all(np.diff(predictions["distances"], axis=1) >= -1e-5)  # best first
    return results


def test_eval_untrained_network_with_pca(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("eval", [*TINY_EVAL, *RESNET], tiny_data_dir, tmp_path / "run")
    evaluate.run(cfg)
    results = _check_outputs(tmp_path / "run", tiny_data_dir / "synthcity" / "raw")
    assert results["descriptor_dim"] == 16  # PCA-whitened
    assert results["images_per_second"] > 0
    assert list((tmp_path / "logs" / "pca").glob("*.safetensors"))  # cached for the next run


def test_eval_rawpixels_command_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(REPO / "eval.py"), *TINY_EVAL, "model=rawpixels",
        f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "R@1" in result.stdout  # the Markdown table
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["descriptor_dim"] == 24 * 32 * 3
    assert results["recall"]["1"] > 0.1  # raw pixels find neighbouring views on the tiny city


def test_eval_folder_format_dataset(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The tiny city's test split re-packed as <root>/images/test/{database,queries}/@e@n@.jpg."""
    source = load_split("synthcity", tiny_data_dir / "synthcity" / "raw", "test")
    root = tmp_path / "folder"
    for kind, paths, utm in (("database", source.db_paths, source.db_utm), ("queries", source.q_paths, source.q_utm)):
        out = root / "images" / "test" / kind
        out.mkdir(parents=True)
        for i, (path, (east, north)) in enumerate(zip(paths, utm, strict=True)):
            shutil.copy(path, out / f"@{east:.2f}@{north:.2f}@{i:05d}@.jpg")
    cfg = compose_cfg(
        "eval",
        [*TINY_EVAL[len(TINY_CITY):], "dataset=folder", f"dataset.root={root}", "dataset.image_size=[64,86]", "model=rawpixels"],
        tiny_data_dir, tmp_path / "run",
    )
    folder_recall = evaluate.run(cfg)
    cfg = compose_cfg("eval", [*TINY_EVAL, "model=rawpixels"], tiny_data_dir, tmp_path / "run2")
    assert folder_recall == pytest.approx(evaluate.run(cfg), abs=0.05)


def test_eval_disk_store_and_ivf_index_give_the_memory_exact_results(tiny_data_dir: Path, tmp_path: Path) -> None:
    """store=disk streams the descriptors to descriptors.npy; an IVF index visiting all its
    lists finds what the exact search finds."""
    base = [*TINY_EVAL, "model=rawpixels", "plots=false"]
    memory = evaluate.run(compose_cfg("eval", base, tiny_data_dir, tmp_path / "memory"))
    approximate = [*base, "store=disk", "search.index='IVF4,Flat'", "search.nprobe=4", "search.train_size=500"]
    disk = evaluate.run(compose_cfg("eval", approximate, tiny_data_dir, tmp_path / "disk"))
    assert disk == memory
    results = json.loads((tmp_path / "disk" / "results.json").read_text())
    assert results["search"] == "IVF4,Flat" and results["descriptor_store"] == str(tmp_path / "disk" / "descriptors.npy")
    store = np.load(results["descriptor_store"], mmap_mode="r")
    assert store.shape == (results["num_queries"] + results["num_database"], results["descriptor_dim"])
    assert store.dtype == np.float16
    topk = [np.load(tmp_path / run / "predictions.npz")["topk"] for run in ("memory", "disk")]
    assert np.mean(topk[0] == topk[1]) > 0.99  # equal but for the order of exact ties


def test_eval_bad_store_or_index_names_the_key(tiny_data_dir: Path, tmp_path: Path) -> None:
    base = [*TINY_EVAL, "model=rawpixels", "plots=false"]
    with pytest.raises(ValueError, match="store='dsk': choose memory"):
        evaluate.run(compose_cfg("eval", [*base, "store=dsk"], tiny_data_dir, tmp_path / "a"))
    with pytest.raises(ValueError, match=r"search.index='IVF4,Fat' is not a faiss index_factory string"):
        evaluate.run(compose_cfg("eval", [*base, "search.index='IVF4,Fat'"], tiny_data_dir, tmp_path / "b"))
