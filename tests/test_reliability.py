"""Reliability and security: what the user sees when data, files or the machine misbehave.

Each test plants one fault in a private copy of the tiny synthetic city (or in a file next to
it) and checks the promise of docs/troubleshooting.md: one message naming the culprit, exit 2,
no traceback (unless WAKD_DEBUG=1), nothing executed from untrusted pickles, nothing half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from conftest import REPO, TINY_TRAIN, compose_cfg

from wakd.cli import run_job
from wakd.data.netvlad_mat import load_dbstruct, save_dbstruct
from wakd.eval import report
from wakd.jobs import evaluate, train
from wakd.models import pca as pca_module
from wakd.models.clustering import write_centroid_file
from wakd.models.pca import PCAWhitening

TINY_EVAL = [
    "dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny",
    "model=rawpixels", "num_workers=0", "batch_size=32", "plots=false",
]
RESNET8 = ["model=resnet18", "model.weights=null", "model.net.num_clusters=8"]  # resnet18 layer3: D=256


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def city(tiny_data_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny city; returns the data dir (…/synthcity/raw inside)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir / "synthcity", data / "synthcity")
    return data


def raw(data: Path) -> Path:
    return data / "synthcity" / "raw"


def expect_exit(job, cfg, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``job`` as the entry scripts do; it must exit 2 with one message and no traceback."""
    with pytest.raises(SystemExit) as info:
        run_job(job, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    return err


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / name), *args], capture_output=True, text=True, cwd=REPO,
        timeout=300, env={**os.environ, **(env or {})},
    )


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def rewrite_mat(path: Path, edit) -> None:
    """Load a dbStruct .mat, let ``edit(fields: dict)`` change it, save it back."""
    struct = scipy.io.loadmat(str(path))["dbStruct"][0, 0]
    fields = {name: struct[name] for name in struct.dtype.names}
    edit(fields)
    scipy.io.savemat(str(path), {"dbStruct": fields})


class Payload:
    """Unpickling calls open(marker, 'w'): the file appears iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, content: dict, marker: Path) -> Path:
    torch.save({**content, "payload": Payload(marker)}, path)
    return path


# ------------------------------------------------------------- missing data: entry scripts
def test_missing_dataset_root_eval_script(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = ["dataset=folder", f"dataset.root={missing}", "model=rawpixels",
            f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}"]
    result = script("eval.py", *args)
    assert result.returncode == 2
    assert f"dataset root {missing} does not exist" in result.stderr
    assert "<root>/images/{train,val,test}/database/" in result.stderr  # the expected tree
    assert "Traceback" not in result.stderr
    assert files_under(run_dir) <= {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    assert not logs.exists()


def test_wakd_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg("eval", ["dataset=folder", f"dataset.root={tmp_path / 'nowhere'}", "model=rawpixels"],
                      tmp_path, tmp_path / "run")
    monkeypatch.setenv("WAKD_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # raised, not turned into exit 2
        run_job(evaluate.run, cfg)


def test_missing_mat_train_script(city: Path, tmp_path: Path) -> None:
    (raw(city) / "synthcity_train.mat").unlink()
    run_dir = tmp_path / "run"
    result = script("train.py", *TINY_TRAIN, "teacher=none", f"paths.data_dir={city}",
                    f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"dataset specification {raw(city) / 'synthcity_train.mat'} not found" in result.stderr
    assert "<root>/synthcity_{train,val,test}.mat" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing but Hydra's record of the run's config: no checkpoints, logs or config.yaml.
    assert files_under(run_dir) <= {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}


@pytest.mark.parametrize("job", ["train", "eval"])
def test_missing_image(job: str, city: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split = "train" if job == "train" else "test"
    name = load_dbstruct(raw(city) / f"synthcity_{split}.mat").db_image_fns[3]
    (raw(city) / "images" / name).unlink()
    if job == "train":
        cfg = compose_cfg("train", [*TINY_TRAIN, "teacher=none"], city, tmp_path / "run")
        err = expect_exit(train.run, cfg, capsys)
    else:
        cfg = compose_cfg("eval", TINY_EVAL, city, tmp_path / "run")
        err = expect_exit(evaluate.run, cfg, capsys)
    assert f"image {raw(city) / 'images' / name} not found" in err
    assert "Expected layout" in err
    assert files_under(tmp_path / "run") <= set()  # train: only the write probe, removed again


# ------------------------------------------------------------------- corrupt images
def _corrupt_two_test_images(city: Path) -> list[Path]:
    db = load_dbstruct(raw(city) / "synthcity_test.mat")
    jpeg = raw(city) / "images" / db.db_image_fns[5]
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # truncated JPEG
    png = raw(city) / "images" / db.db_image_fns[9]
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG header and nothing else
    return [jpeg, png]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_is_named(
    num_workers: int, city: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wakd.data.images.cpu_workers", lambda n: n)  # a real worker on any machine
    bad = _corrupt_two_test_images(city)
    cfg = compose_cfg("eval", [*TINY_EVAL, f"num_workers={num_workers}"], city, tmp_path / "run")
    err = expect_exit(evaluate.run, cfg, capsys)
    assert f"cannot read image {bad[0]}" in err  # first in the database: met first
    assert "DataLoader worker" not in err  # a worker's traceback is not part of the message
    assert not (tmp_path / "run" / "results.json").exists()


def test_corrupt_images_skipped_and_counted(city: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _corrupt_two_test_images(city)
    cfg = compose_cfg("eval", [*TINY_EVAL, "skip_corrupt=true"], city, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        evaluate.run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_images"] == 2
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(bad[0]) in warned and str(bad[1]) in warned
    topk = np.load(tmp_path / "run" / "predictions.npz")["topk"]
    db = load_dbstruct(raw(city) / "synthcity_test.mat")
    skipped = [db.db_image_fns.index(p.relative_to(raw(city) / "images").as_posix()) for p in bad]
    assert not np.isin(topk, skipped).any()  # a skipped image is never retrieved


def _fake_centroids(path: Path, k: int = 8, d: int = 256) -> Path:
    rng = np.random.default_rng(0)
    write_centroid_file(path, rng.standard_normal((k, d)).astype(np.float32),
                        rng.standard_normal((10 * k, d)).astype(np.float32))
    return path


def test_training_skips_corrupt_image(city: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = load_dbstruct(raw(city) / "synthcity_train.mat")
    bad = raw(city) / "images" / db.db_image_fns[0]
    bad.write_bytes(bad.read_bytes()[:100])
    overrides = [*TINY_TRAIN, "teacher=none", "trainer.limit_train_batches=1",
                 f"centroids={_fake_centroids(tmp_path / 'c.hdf5')}"]
    cfg = compose_cfg("train", overrides, city, tmp_path / "strict")
    with pytest.raises(OSError, match=re.escape(f"cannot read image {bad}")):
        train.run(cfg)
    cfg = compose_cfg("train", [*overrides, "datamodule.skip_corrupt=true"], city, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        train.run(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_clustering_honours_skip_corrupt(city: Path, tmp_path: Path) -> None:
    db = load_dbstruct(raw(city) / "synthcity_train.mat")
    bad = raw(city) / "images" / db.db_image_fns[0]
    bad.write_bytes(bad.read_bytes()[:100])
    overrides = [*TINY_TRAIN, "teacher=none", "trainer.limit_train_batches=1",
                 "cluster.num_images=100000", "datamodule.skip_corrupt=true"]  # every image clustered
    train.run(compose_cfg("train", overrides, city, tmp_path / "run"))


# -------------------------------------------------------------------- broken .mat files
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.pop("utmQ"), "dbStruct lacks field(s) utmQ"),
        (lambda f: f.update(utmDb=f["utmDb"].T), "field 'utmDb' has shape"),
        (lambda f: f.update(utmQ=f["utmQ"][:, :-1]), "field 'utmQ' has shape"),
        (lambda f: f.update(posDistThr=np.array([[25.0, 10.0]])), "field 'posDistThr' should be a scalar"),
    ],
    ids=["missing-field", "transposed", "wrong-length", "not-scalar"],
)
def test_broken_mat_names_field_and_file(edit, message: str, city: Path, tmp_path: Path, capsys) -> None:
    mat = raw(city) / "synthcity_test.mat"
    rewrite_mat(mat, edit)
    err = expect_exit(evaluate.run, compose_cfg("eval", TINY_EVAL, city, tmp_path / "run"), capsys)
    assert str(mat) in err and message in err


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "000/../../synthcity_test.mat"])
def test_image_name_escaping_root_is_refused(name: str, city: Path, tmp_path: Path, capsys) -> None:
    mat = raw(city) / "synthcity_test.mat"

    def escape(fields: dict) -> None:
        fields["qImageFns"][0, 0] = np.array([name])

    rewrite_mat(mat, escape)
    err = expect_exit(evaluate.run, compose_cfg("eval", TINY_EVAL, city, tmp_path / "run"), capsys)
    assert f"image name {name!r} does not lie inside" in err and str(mat) in err


def test_unknown_group_option_eval_script() -> None:
    """tests/test_configs.py covers train.py; the other entry script fails the same way."""
    result = script("eval.py", "dataset=no_such_dataset", "--cfg", "job")
    assert result.returncode != 0 and "no_such_dataset" in result.stderr


# --------------------------------------------------------------- checkpoints & centroids
def _resnet_state(k: int) -> dict[str, torch.Tensor]:
    from wakd.models import build_place_net

    return build_place_net("resnet18", cut="layer3", num_clusters=k).state_dict()


def test_checkpoint_of_another_size_lists_shapes(city: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "k16.pth"
    torch.save(_resnet_state(16), ckpt)
    cfg = compose_cfg("eval", [*TINY_EVAL, *RESNET8, f"ckpt={ckpt}", "pca=false"], city, tmp_path / "run")
    err = expect_exit(evaluate.run, cfg, capsys)
    assert str(ckpt) in err and "shape mismatch" in err
    assert "pool.centroids: file (16, 256) vs model (8, 256)" in err


def test_checkpoint_of_another_architecture_lists_keys(city: Path, tmp_path: Path, capsys) -> None:
    from wakd.models import build_place_net

    ckpt = tmp_path / "mnv3.pth"
    net = build_place_net("mobilenetv3_large", cut="stride16", num_clusters=8, proj_dim=64)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    cfg = compose_cfg("eval", [*TINY_EVAL, *RESNET8, f"ckpt={ckpt}", "pca=false"], city, tmp_path / "run")
    err = expect_exit(evaluate.run, cfg, capsys)
    assert "missing in file" in err and "unexpected in file" in err
    assert "backbone.features.0.0.weight" in err or "backbone." in err


@pytest.mark.parametrize(("k", "d"), [(4, 256), (8, 64)])
def test_centroids_of_wrong_size_name_both(k: int, d: int, city: Path, tmp_path: Path, capsys) -> None:
    centroids = _fake_centroids(tmp_path / "bad.hdf5", k, d)
    cfg = compose_cfg("train", [*TINY_TRAIN, "teacher=none", f"centroids={centroids}"], city, tmp_path / "run")
    err = expect_exit(train.run, cfg, capsys)
    assert str(centroids) in err
    assert f"K={k} x D={d}" in err and "model's NetVLAD is K=8 x D=256" in err


# ---------------------------------------------------------------------- malicious pickles
def test_payload_is_live(tmp_path: Path) -> None:
    """The planted payload really runs when a file is unpickled without weights_only."""
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "evil.pt", {}, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _openibl_state() -> dict[str, torch.Tensor]:
    state = _resnet_state(8)
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            out["module.base_model." + key.removeprefix("backbone.")] = value
        elif key.startswith("pool."):
            out["module.net_vlad." + key.removeprefix("pool.")] = value
    return out


@pytest.mark.parametrize("path_kind", ["eval-ckpt", "eval-openibl", "teacher-ckpt", "model-weights", "resume"])
def test_malicious_pickle_is_refused(path_kind: str, city: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    if path_kind == "eval-openibl":
        plant(evil, {"state_dict": _openibl_state()}, marker)
    else:
        plant(evil, {"state_dict": {f"net.{k}": v for k, v in _resnet_state(8).items()}}, marker)
    train_base = [*TINY_TRAIN, "teacher=none", f"centroids={_fake_centroids(tmp_path / 'c.hdf5')}"]
    if path_kind.startswith("eval"):
        cfg = compose_cfg("eval", [*TINY_EVAL, *RESNET8, f"ckpt={evil}"], city, tmp_path / "run")
        job = evaluate.run
    else:
        extra = {
            "teacher-ckpt": ["teacher=resnet18", "teacher.net.num_clusters=8", f"teacher.ckpt={evil}"],
            "model-weights": [f"model.weights={evil}"],
            "resume": [f"ckpt_path={evil}"],
        }[path_kind]
        cfg = compose_cfg("train", [*train_base, *extra], city, tmp_path / "run")
        job = train.run
    err = expect_exit(job, cfg, capsys)
    assert not marker.exists(), "the pickled payload was executed"
    assert "refusing to load" in err and "nothing in it was executed" in err
    if path_kind != "resume":  # Lightning's own torch.load does not tell us the file
        assert str(evil) in err


# ----------------------------------------------------------------------- atomic writes
def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_failed_results_and_predictions_keep_previous(tmp_path: Path, monkeypatch) -> None:
    kw = dict(dataset="d", split="test", checkpoint=None, num_queries=1, num_database=2,
              descriptor_dim=4, images_per_second=1.0, seconds_total=1.0)
    report.write_results(tmp_path, recall={1: 0.5}, **kw)
    report.write_predictions(tmp_path, ["q"], ["a", "b"], np.array([[0]]), np.array([[0.1]]))
    before = {n: (tmp_path / n).read_bytes() for n in ("results.json", "predictions.npz")}

    def half_then_fail(f, **_):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.np, "savez", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        report.write_predictions(tmp_path, ["q"], ["a", "b"], np.array([[1]]), np.array([[0.2]]))
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        report.write_results(tmp_path, recall={1: 0.9}, **kw)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert _no_temp_files(tmp_path)


def test_failed_pca_save_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "pca.safetensors"
    PCAWhitening.fit(torch.randn(20, 8), 4).save(path)
    before = path.read_bytes()

    def half_then_fail(tensors, filename):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pca_module, "save_file", half_then_fail)
    with pytest.raises(OSError):
        PCAWhitening.fit(torch.randn(20, 8), 4).save(path)
    assert path.read_bytes() == before and _no_temp_files(tmp_path)
    PCAWhitening.load(path)


def test_failed_centroid_write_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    path = _fake_centroids(tmp_path / "c.hdf5")
    before = path.read_bytes()
    original = h5py.Group.create_dataset

    def fail_on_descriptors(self, name, *args, **kwargs):
        if name == "descriptors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_descriptors)
    with pytest.raises(OSError):
        _fake_centroids(path, 4, 16)
    assert path.read_bytes() == before and _no_temp_files(tmp_path)


def test_failed_mat_write_keeps_previous(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    db = load_dbstruct(tiny_data_dir / "synthcity" / "raw" / "synthcity_test.mat")
    path = tmp_path / "x.mat"
    save_dbstruct(db, path)
    before = path.read_bytes()

    def half_then_fail(file_name, mdict, **_):
        Path(file_name).write_bytes(b"MATLAB 5.0 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scipy.io, "savemat", half_then_fail)
    with pytest.raises(OSError):
        save_dbstruct(db, path)
    assert path.read_bytes() == before and _no_temp_files(tmp_path)


def test_lightning_checkpoints_are_written_atomically() -> None:
    """Lightning serialises to memory, then writes through an fsspec transaction (temp + move)."""
    import inspect

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.fabric.utilities import cloud_io

    assert "_atomic_save" in inspect.getsource(TorchCheckpointIO.save_checkpoint)
    source = inspect.getsource(cloud_io._atomic_save)
    assert "BytesIO" in source and "transaction" in source


# ---------------------------------------------------------------- unwritable run directory
def test_unwritable_log_dir_fails_before_training(city: Path, monkeypatch, capsys) -> None:
    run_dir = Path("/dev/null/x/run")  # under a file: not even root can create it
    cfg = compose_cfg("train", [*TINY_TRAIN, "teacher=none"], city, run_dir)
    monkeypatch.setattr(train, "ensure_dataset", lambda *_: pytest.fail("got past the check"))
    err = expect_exit(train.run, cfg, capsys)
    assert f"cannot write to the run directory {run_dir}" in err and "paths.log_dir=DIR" in err


def test_full_disk_is_reported(tmp_path: Path, monkeypatch) -> None:
    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(OSError, match=re.escape("No space left on device. Choose another with paths.log_dir")):
        train.check_writable(tmp_path / "run")


# ---------------------------------------------------------------- SIGKILL, then resume
def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_mid_training_then_resume(tiny_data_dir: Path, tmp_path: Path) -> None:
    three_rounds = [*TINY_TRAIN, "teacher=none", "module.schedule.first_passes=3", "datamodule.augment=false",
                    "trainer.limit_train_batches=2"]
    logs = tmp_path / "logs"  # shared: the reference run leaves the centroids for the others
    train.run(compose_cfg("train", three_rounds, tiny_data_dir, tmp_path / "full"))

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *three_rounds, f"paths.data_dir={tiny_data_dir}",
             f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 240
            # Round 0 checkpointed and round 1 mined: the second round is training now.
            while not (last.is_file() and "mining round 1" in stderr_path.read_text(errors="replace")):
                assert proc.poll() is None, stderr_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.1)
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] < 2  # it really was cut short

    resumed = compose_cfg("train", [*three_rounds, f"ckpt_path={last}"], tiny_data_dir, run_dir)
    train.run(resumed)
    a, b = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt"), _weights(last)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs after resume")
