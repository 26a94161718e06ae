"""results.json / predictions.npz round trips, Markdown tables, plots and the bench helper."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from wakd.atomic import atomic_write_text
from wakd.eval.plots import pick_examples, plot_attention, plot_recall_curve, plot_retrievals
from wakd.eval.recall import recall_at_n
from wakd.eval.report import recall_table, write_predictions, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _toy_predictions(seed: int = 0, num_q: int = 40, num_db: int = 60, k: int = 20):
    rng = np.random.default_rng(seed)
    topk = np.stack([rng.choice(num_db, k, replace=False) for _ in range(num_q)]).astype(np.int64)
    distances = np.sort(rng.uniform(0, 2, size=(num_q, k)), axis=1).astype(np.float32)
    positives = [rng.choice(num_db, rng.integers(0, 4), replace=False) for _ in range(num_q)]
    return topk, distances, positives


def test_results_and_predictions_are_consistent(tmp_path):
    topk, distances, positives = _toy_predictions()
    num_q, num_db = topk.shape[0], 60
    recall = recall_at_n(topk, positives)
    q_paths = [f"queries/ü_{i:03d}.jpg" for i in range(num_q)]
    db_paths = [f"database/{i:05d}.png" for i in range(num_db)]
    res_path = write_results(
        tmp_path, dataset="pitts30k", split="test", checkpoint="last.ckpt",
        num_queries=num_q, num_database=num_db, descriptor_dim=4096, recall=recall,
        images_per_second=12.5, seconds_total=3.0, pca=True,
    )
    pred_path = write_predictions(tmp_path, q_paths, db_paths, topk, distances)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.npz", "results.json"]

    results = json.loads(res_path.read_text())
    assert list(results["recall"]) == ["1", "5", "10", "20"]
    assert all(0.0 <= v <= 1.0 for v in results["recall"].values())
    assert results["pca"] is True and results["num_queries"] == num_q

    with np.load(pred_path, allow_pickle=False) as npz:
        assert npz["query_paths"].dtype.kind == "U"
        assert npz["query_paths"].tolist() == q_paths
        assert npz["database_paths"].tolist() == db_paths
        np.testing.assert_array_equal(npz["distances"], distances)
        reloaded = npz["topk"]
    assert reloaded.dtype == np.int64
    again = recall_at_n(reloaded, positives)
    assert {str(n): v for n, v in again.items()} == results["recall"]


def test_write_results_rejects_percentages(tmp_path):
    with pytest.raises(ValueError):
        write_results(tmp_path, dataset="d", split="s", checkpoint=None, num_queries=1,
                      num_database=1, descriptor_dim=1, recall={1: 85.3},
                      images_per_second=1.0, seconds_total=1.0)
    assert not list(tmp_path.iterdir())


def test_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_recall_table_percent_one_decimal():
    table = recall_table({"NetVLAD": {1: 0.8512, 5: 0.9249}, "WAKD": {"1": 0.87, "5": 0.9351}})
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | R@1 | R@5 |"
    assert lines[2] == "| NetVLAD | 85.1 | 92.5 |"
    assert lines[3] == "| WAKD | 87.0 | 93.5 |"
    assert recall_table([("A", {1: 0.5}), ("B", {5: 0.25})]).strip().splitlines()[2:] == [
        "| A | 50.0 | - |", "| B | - | 25.0 |"
    ]


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # noqa: E731
    plot_retrievals(tmp_path / "ret.png", [img(), img()], [[img() for _ in range(5)]] * 2,
                    [[True, False, False, True, False], [False] * 5], titles=["q0", "q1"])
    plot_recall_curve(tmp_path / "curve.png", {"a": {1: 0.5, 5: 0.7, 10: 0.8}, "b": {1: 0.6, 5: 0.9}})
    plot_attention(tmp_path / "att.png", [img(), img()],
                   {"teacher": [rng.random((6, 8)), rng.random((6, 8))],
                    "student": [np.zeros((3, 4)), rng.random((3, 4))]})
    for name in ("ret.png", "curve.png", "att.png"):
        assert _is_png(tmp_path / name), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att.png", "curve.png", "ret.png"]


def test_pick_examples_mixes_correct_and_wrong():
    topk = np.array([[0], [1], [2], [3], [4], [5]])
    positives = [np.array([0]), np.array([9]), np.array([2]), np.array([]), np.array([4]), np.array([5])]
    correct = {0, 2, 4, 5}
    picked = pick_examples(topk, positives, num=4, seed=1)
    assert len(picked) == len(set(picked)) == 4
    assert sum(i in correct for i in picked) == 2
    assert picked[:2] == sorted(picked[:2]) and all(i in correct for i in picked[:2])
    # Only two wrong queries exist, so asking for 5 takes both and fills with correct ones.
    picked = pick_examples(topk, positives, num=5)
    assert sum(i not in correct for i in picked) == 2 and len(set(picked)) == 5
    assert pick_examples(topk, positives, num=4, seed=1) == pick_examples(topk, positives, 4, 1)


def _bench_results_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "_results.py"
    spec = importlib.util.spec_from_file_location("bench_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_helper_merges_keys_and_replaces_own_section(tmp_path):
    helper = _bench_results_module()
    js, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    old = {"value": 1, "date": "2026-01-01 00:00 UTC", "machine": "elsewhere", "load": "0.1"}
    js.write_text(json.dumps({"other": old, "p4_recall_seconds": {**old, "value": 99}}))
    md.write_text("# R\n\n<!-- p3 -->\nkeep me\n<!-- /p3 -->\n")
    helper.merge_results({"p4_recall_seconds": 30.5}, path=js, load="2.0 at the start")
    merged = json.loads(js.read_text())
    assert merged["other"] == old  # other keys keep their own provenance
    assert merged["p4_recall_seconds"]["value"] == 30.5 and merged["p4_recall_seconds"]["load"] == "2.0 at the start"
    assert merged["p4_recall_seconds"]["machine"] in helper.machine() and merged["p4_recall_seconds"]["date"] != old["date"]
    assert helper.values(js) == {"other": 1, "p4_recall_seconds": 30.5}
    table = md.read_text()  # the current table, rewritten by the merge
    assert "| `p4_recall_seconds` | 30.5 |" in table and "| `other` | 1 | 2026-01-01 00:00 UTC | elsewhere | 0.1 |" in table
    assert "keep me" in table

    helper.replace_section("p4", "first", path=md)
    helper.replace_section("p4", "second", path=md)
    text = md.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("<!-- p4 -->") == 1 and text.count("<!-- /p4 -->") == 1
    assert "cores" in helper.machine()
