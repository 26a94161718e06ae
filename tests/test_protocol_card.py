"""Protocol cards (wakd.eval.protocol) in results.json and checkpoints, and the report over
many results (wakd.report)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from conftest import REPO, TINY_TRAIN, compose_cfg

from wakd.data.datasets import load_split
from wakd.eval.protocol import ProtocolMismatch, card, split_protocol, weights_hash
from wakd.eval.report import write_results
from wakd.jobs import evaluate, train
from wakd.report import ReportError, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mat_lists(mat: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray, float]:
    """Query and database names, UTM and threshold read straight from a NetVLAD .mat."""
    db = sio.loadmat(mat)["dbStruct"][0, 0]
    names = [str(np.ravel(x)[0]) for x in db["qImageFns"].ravel()], [str(np.ravel(x)[0]) for x in db["dbImageFns"].ravel()]
    utm_q, utm_db = np.asarray(db["utmQ"], dtype=float), np.asarray(db["utmDb"], dtype=float)
    if utm_q.shape[0] == 2 and utm_q.shape[1] != 2:  # stored 2 x N
        utm_q, utm_db = utm_q.T, utm_db.T
    return names[0], names[1], utm_q, utm_db, float(np.ravel(db["posDistThr"])[0])


def _expected_protocol(root: Path, split: str, image_size: list[int]) -> dict:
    """The protocol fields recomputed from the split's .mat, without wakd's loaders."""
    queries, database, utm_q, utm_db, thr = _mat_lists(root / f"synthcity_{split}.mat")
    listing = ["queries", *(f"queries/{q}" for q in queries), "database", *(f"images/{d}" for d in database)]
    distances = np.linalg.norm(utm_q[:, None, :] - utm_db[None, :, :], axis=2)  # [Q, N]
    return {
        "dataset": "synthcity", "variant": "synthcity", "split": split,
        "file_list_sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest(),
        "num_queries": len(queries), "num_database": len(database),
        "queries_without_positive": int((distances.min(axis=1) > thr).sum()),
        "pos_dist_thr": thr, "image_size": image_size, "panorama_dedup": False, "time_rule": None,
    }


def test_card_fields_match_an_independent_computation(tiny_data_dir: Path) -> None:
    root = tiny_data_dir / "synthcity" / "raw"
    for split in ("val", "test"):
        protocol = split_protocol(load_split("synthcity", root, split), dataset="synthcity", variant=None, image_size=(64, 86))
        expected = _expected_protocol(root, split, [64, 86])
        assert {k: protocol[k] for k in expected} == expected
        assert "64x86" in protocol["resize"]
        assert protocol["no_positive_queries"].startswith("counted as misses")


def test_weights_hash_follows_every_weight_but_not_pca() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = net.state_dict()
    same = {k: v.clone() for k, v in reversed(list(state.items()))}  # another order, copies
    assert weights_hash(same) == weights_hash(state)
    assert weights_hash({**state, "pca.weight": torch.ones(2, 2)}) == weights_hash(state)
    changed = {k: v.clone() for k, v in state.items()}
    changed["0.weight"][0, 0, 0, 0] += 1e-6
    assert weights_hash(changed) != weights_hash(state)
    assert weights_hash({**state, "1.running_mean": state["1.running_mean"].double()}) != weights_hash(state)


@pytest.fixture(scope="module")
def trained(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("card_train") / "run"
    train.run(compose_cfg("train", [*TINY_TRAIN, "teacher=none", "seed=3"], tiny_data_dir, run_dir))
    return run_dir / "checkpoints" / "best.ckpt"


def test_checkpoint_card_describes_the_validation_that_selected_it(trained: Path, tiny_data_dir: Path) -> None:
    stored = torch.load(trained, map_location="cpu", weights_only=True)
    ckpt_card = stored["wakd"]["card"]
    expected = _expected_protocol(tiny_data_dir / "synthcity" / "raw", "val", [64, 86])
    assert {k: ckpt_card["protocol"][k] for k in expected} == expected
    described = ckpt_card["descriptive"]
    net_state = {k.removeprefix("net."): v for k, v in stored["state_dict"].items() if k.startswith("net.")}
    assert described["weights_sha256"] == weights_hash(net_state)  # the weights in this very file
    assert described["model"] == "resnet18" and described["seed"] == 3
    assert described["selected_on"]["split"] == "val" and "val/R@5" in described["selected_on"]["monitor"]
    assert len(described["git_commit"]) >= 40 and described["wakd_version"]


def test_eval_writes_the_card_of_the_checkpoint_it_evaluates(trained: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    overrides = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny", "split=val",
                 "num_workers=0", "batch_size=32", "pca=false", "plots=false", f"ckpt={trained}"]
    evaluate.run(compose_cfg("eval", overrides, tiny_data_dir, tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ckpt_card = torch.load(trained, map_location="cpu", weights_only=True)["wakd"]["card"]
    # Evaluated on the split that selected it: the same protocol, the same weights.
    assert results["card"]["protocol"] == ckpt_card["protocol"]
    described = results["card"]["descriptive"]
    assert described["weights_sha256"] == ckpt_card["descriptive"]["weights_sha256"]
    assert described["selected_on"] == ckpt_card["descriptive"]["selected_on"]
    assert described["checkpoint"] == str(trained) and described["search"] == {"index": "exact"}
    assert described["pca"] is None
    assert results["card"]["protocol"]["queries_without_positive"] == results["queries_without_positive"]


def test_queries_resized_by_their_shorter_side(tiny_data_dir: Path, tmp_path: Path) -> None:
    """dataset.query_shorter_side (Tokyo 24/7's query resizing): queries keep their aspect at
    that shorter side, database images stay at image_size, and the card says so. The
    distances eval.py reports are recomputed here from PIL + torchvision directly."""
    import torchvision.transforms as T
    from PIL import Image

    from wakd.synth.rawpixels import RawPixels

    split = load_split("synthcity", tiny_data_dir / "synthcity" / "raw", "val")
    width, height = Image.open(split.db_paths[0]).size
    side = 40
    # The database at its own size (a resize to it changes nothing), queries at a shorter side of 40.
    evaluate.run(compose_cfg("eval", [
        "model=rawpixels", "dataset=synthcity", "dataset.generate.preset=tiny", "split=val", "num_workers=0",
        "batch_size=32", "pca=false", "plots=false", f"dataset.image_size=[{height},{width}]",
        f"+dataset.query_shorter_side={side}",
    ], tiny_data_dir, tmp_path / "run"))
    predictions = np.load(tmp_path / "run" / "predictions.npz")
    protocol = json.loads((tmp_path / "run" / "results.json").read_text())["card"]["protocol"]
    assert protocol["query_shorter_side"] == side
    assert f"queries to a {side}-pixel shorter side, aspect kept" in protocol["resize"]

    net = RawPixels()

    def describe(paths: list[str], resize: T.Resize | None) -> torch.Tensor:
        images = [Image.open(p).convert("RGB") for p in paths]
        return torch.cat([net(T.ToTensor()(resize(im) if resize else im)[None]) for im in images])

    database = describe(split.db_paths, None)
    for resize, expected_close in ((T.Resize(side), True), (None, False)):  # the second: queries not resized
        queries = describe(split.q_paths, resize)
        recomputed = torch.cdist(queries, database).pow(2).numpy()  # [Q, N] squared L2
        reported = np.take_along_axis(recomputed, predictions["topk"], axis=1)
        # fp16 descriptor storage: distances to about 1e-3
        assert np.allclose(reported, predictions["distances"], atol=3e-3) == expected_close


def test_shorter_side_transform_keeps_the_aspect() -> None:
    from PIL import Image

    from wakd.data.images import build_transform

    transform = build_transform(48, train=False)
    assert transform.image_size is None  # sizes differ between images
    assert tuple(transform(Image.new("RGB", (640, 480))).shape) == (3, 48, 64)
    assert tuple(transform(Image.new("RGB", (300, 400))).shape) == (3, 64, 48)


# ---------------------------------------------------------------- the report


def _fake_run(run_dir: Path, dataset: str, model: str, weights: str, recall: dict[int, float], **protocol_changes) -> Path:
    protocol = {
        "dataset": dataset, "variant": dataset, "split": "test", "file_list_sha256": hashlib.sha256(dataset.encode()).hexdigest(),
        "num_queries": 100, "num_database": 500, "queries_without_positive": 2, "no_positive_queries": "counted as misses",
        "pos_dist_thr": 25.0, "time_rule": None, "panorama_dedup": False, "image_size": [480, 640], "resize": "480x640",
        **protocol_changes,
    }
    result_card = card(protocol, model=model, weights_sha256=weights, checkpoint=f"{model}.ckpt", seed=0,
                       search={"index": "exact"})
    write_results(run_dir, dataset=dataset, split="test", checkpoint=f"{model}.ckpt", num_queries=100, num_database=500,
                  descriptor_dim=4096, recall=recall, images_per_second=10.0, seconds_total=1.0, card=result_card)
    return run_dir


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two sweep-like directories: model a on two datasets, model b on one."""
    first, second = tmp_path / "sweep1", tmp_path / "sweep2"
    _fake_run(first / "0", "pitts30k", "vgg16", "a" * 64, {1: 0.85, 5: 0.93, 10: 0.95, 20: 0.97})
    _fake_run(first / "1", "tokyo247", "vgg16", "a" * 64, {1: 0.6, 5: 0.75, 10: 0.8})
    _fake_run(second, "pitts30k", "mobilenetv3", "b" * 64, {1: 0.801, 5: 0.9, 10: 0.93})
    return first, second


def test_report_puts_results_side_by_side(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    paths = write_report(list(two_runs), tmp_path / "out")
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["model", "weights_sha256", "checkpoint", "pitts30k/test R@1", "pitts30k/test R@5",
                       "pitts30k/test R@10", "tokyo247/test R@1", "tokyo247/test R@5", "tokyo247/test R@10"]
    assert rows[1:] == [["mobilenetv3 bbbbbbbb", "b" * 64, "mobilenetv3.ckpt", "80.1", "90.0", "93.0", "-", "-", "-"],
                        ["vgg16 aaaaaaaa", "a" * 64, "vgg16.ckpt", "85.0", "93.0", "95.0", "60.0", "75.0", "80.0"]]
    text = paths["md"].read_text()
    assert "| vgg16 aaaaaaaa | 85.0 | 93.0 | 95.0 | 60.0 | 75.0 | 80.0 |" in text
    assert "R@20" not in text  # R@1/5/10 only
    assert "| tokyo247/test | tokyo247 | test | 100 | 500 | 2 | 25.0 | [480, 640] |" in text  # its card
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_report_refuses_differing_protocol_naming_the_field(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    _fake_run(tmp_path / "other", "pitts30k", "resnet18", "c" * 64, {1: 0.7, 5: 0.8, 10: 0.9}, pos_dist_thr=10.0)
    with pytest.raises(ProtocolMismatch, match=r"'pos_dist_thr' differs: 10\.0 \(.*other.*\) vs 25\.0 \(.*sweep1") as info:
        write_report([*two_runs, tmp_path / "other"], tmp_path / "out")
    assert info.value.field == "pos_dist_thr"
    assert not (tmp_path / "out").exists()  # nothing written
    # Another split of the same dataset is another column, not a conflict.
    _fake_run(tmp_path / "val", "pitts30k", "resnet18", "c" * 64, {1: 0.7, 5: 0.8, 10: 0.9}, split="val")
    assert "pitts30k/val R@1" in write_report([*two_runs, tmp_path / "val"], tmp_path / "out")["csv"].read_text()


def test_report_refuses_results_without_a_card_or_twice_the_same_cell(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    write_results(old, dataset="pitts30k", split="test", checkpoint=None, num_queries=1, num_database=1,
                  descriptor_dim=8, recall={1: 1.0}, images_per_second=1.0, seconds_total=1.0)
    with pytest.raises(ReportError, match="no protocol card"):
        write_report([old])
    twice = tmp_path / "twice"
    _fake_run(twice, "pitts30k", "mobilenetv3", "b" * 64, {1: 0.5, 5: 0.6, 10: 0.7})
    with pytest.raises(ReportError, match="two results for model mobilenetv3 bbbbbbbb on pitts30k/test"):
        write_report([*two_runs, twice], tmp_path / "out")


def test_report_command_line(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "wakd.report", *map(str, two_runs)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| vgg16 aaaaaaaa | 85.0 |" in done.stdout
    assert (two_runs[0] / "report.md").is_file() and (two_runs[0] / "report.png").is_file()  # default: first dir
    # Models are compared each at its own input size; the test set's query resizing must match.
    other_input = copy.deepcopy(json.loads((two_runs[1] / "results.json").read_text()))
    other_input["card"]["protocol"]["image_size"] = [322, 322]
    other_input["model"] = other_input["card"]["descriptive"]["model"] = "salad"
    other_input["card"]["descriptive"]["weights_sha256"] = "c" * 64
    (tmp_path / "salad").mkdir()
    (tmp_path / "salad" / "results.json").write_text(json.dumps(other_input))
    done = subprocess.run([*cmd, str(tmp_path / "salad")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = copy.deepcopy(json.loads((two_runs[1] / "results.json").read_text()))
    bad["card"]["protocol"]["query_shorter_side"] = 640
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text(json.dumps(bad))
    done = subprocess.run([*cmd, str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "'query_shorter_side' differs: 640 (" in done.stderr


def test_eval_multirun_writes_one_table(tiny_data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(REPO / "eval.py"), "-m", "split=val,test", "model=rawpixels", "dataset=synthcity",
        "dataset.image_size=[64,86]", "dataset.generate.preset=tiny", "num_workers=0", "batch_size=32", "plots=false",
        f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.reader((sweep / "report.csv").open()))
    assert rows[0][3:] == [f"synthcity/{s} R@{n}" for s in ("test", "val") for n in (1, 5, 10)]
    assert len(rows) == 2 and rows[1][0].startswith("rawpixels")
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    for column, split in ((3, "test"), (6, "val")):
        r1 = next(r["recall"]["1"] for r in results if r["split"] == split)
        assert float(rows[1][column]) == pytest.approx(100 * r1, abs=0.05)
    assert (sweep / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_pretraining_checkpoint_has_a_card(tiny_data_dir: Path, tmp_path: Path) -> None:
    from conftest import PRETRAIN

    from wakd.synth import pretrain_job as pretrain

    short = [*PRETRAIN, "trainer.max_steps=4", "trainer.limit_train_batches=2"]
    pretrain.run(compose_cfg("train", short, tiny_data_dir, tmp_path / "run"))
    ckpts = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts
    stored = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    ckpt_card = stored["wakd"]["card"]
    expected = _expected_protocol(tiny_data_dir / "synthcity" / "raw", "val", [64, 86])
    assert {k: ckpt_card["protocol"][k] for k in expected} == expected
    net_state = {k.removeprefix("net."): v for k, v in stored["state_dict"].items() if k.startswith("net.")}
    assert ckpt_card["descriptive"]["weights_sha256"] == weights_hash(net_state)
    assert ckpt_card["descriptive"]["selected_on"]["monitor"] == ["val/R@1"]
