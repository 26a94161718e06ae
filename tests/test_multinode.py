"""Several nodes, simulated on one machine: torchrun with ``--nnodes=2 --nproc_per_node=1``,
both node ranks started here, gloo on the CPU over localhost; and a job run through Hydra's
submitit launcher (its local executor: the SLURM one needs a cluster).

Every process below is started at once by one module fixture (they take about a minute
together on 2 busy cores, against twice that one after the other):

- ``describe``: extraction of datasets whose size the world size does not divide, two
  nodes x one process (this file run as a script under torchrun);
- ``single`` / ``nodes``: ``train.py`` on the tiny city, two mining rounds of 3 steps, as one
  process with 2 tuples per step and as 2 nodes x 1 process with 1 tuple per rank;
- ``eval``: ``eval.py`` on the tiny city as 2 nodes x 1 process;
- ``submitit``: ``train.py -m hydra/launcher=submitit_local`` on the tiny city.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, TINY_TRAIN, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf
from test_ddp import SIZES, Describe, IndexImages, _free_port
from torch.utils.data import SequentialSampler

from wakd.data.datamodule import TupleDataModule
from wakd.data.tuple_miner import MinedTuple
from wakd.distributed import check_shared_run_dir
from wakd.jobs import evaluate
from wakd.jobs import train as train_job
from wakd.jobs.common import ensure_dataset
from wakd.modules import mining_rounds

NODES = 2
# Final weights of the 2-node run agree with the 1-process run's to float32 rounding: see
# test_two_nodes_train_to_the_weights_of_one_process.
WEIGHT_ATOL = 1e-5

# Frozen BatchNorm: the loss of a tuple then does not depend on the other tuples of its step,
# so 2 ranks x 1 tuple and 1 process x 2 tuples compute the same gradient.
TRAIN = [
    *TINY_TRAIN, "teacher=none", "module.freeze_batchnorm=true", "module.schedule.first_passes=2",
    # One checkpoint per round (round0.ckpt, round1.ckpt), each with the next round's tuples.
    "callbacks.last_checkpoint.filename='round{epoch}'", "callbacks.last_checkpoint.save_top_k=-1",
    "+callbacks.last_checkpoint.auto_insert_metric_name=false",
]
NODE_TRAIN = ["trainer=ddp_multinode", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.sync_batchnorm=false"]
# eval.py of an untrained ResNet18 + NetVLAD (seeded), PCA fitted on the train split.
EVAL = [
    "dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny", "model=resnet18",
    "model.weights=null", "model.net.num_clusters=8", "pca_dim=16", "num_workers=0", "batch_size=32", "plots=false",
]


def _env() -> dict[str, str]:
    """This checkout's wakd in every child (torchrun's workers, submitit's job), one thread each:
    five processes share two cores."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(node_rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One node of a 2-node torchrun job (``python -m torch.distributed.run`` is torchrun)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1",
        f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *args,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("multinode")
    data = f"paths.data_dir={tiny_data_dir}"
    train = [sys.executable, str(REPO / "train.py")]
    procs = {
        "single": _start(
            [*train, *TRAIN, "datamodule.tuples_per_batch=2", data, f"paths.log_dir={root / 'logs-single'}",
             f"hydra.run.dir={root / 'single'}"],
            root / "single.log",
        ),
        "submitit": _start(
            [*train, "-m", "hydra/launcher=submitit_local", *TINY_TRAIN, "teacher=none", data,
             f"paths.log_dir={root / 'logs-submitit'}", f"hydra.sweep.dir={root / 'sweep'}",
             "hydra.launcher.timeout_min=10"],
            root / "submitit.log",
        ),
    }
    train_port, describe_port, eval_port = _free_port(), _free_port(), _free_port()
    for rank in range(NODES):
        procs[f"eval{rank}"] = _torchrun(
            rank, eval_port,
            [str(REPO / "eval.py"), *EVAL, data, f"paths.log_dir={root / 'logs-eval'}", f"hydra.run.dir={root / 'eval'}"],
            root / f"eval{rank}.log",
        )
        procs[f"nodes{rank}"] = _torchrun(
            rank, train_port,
            [str(REPO / "train.py"), *TRAIN, *NODE_TRAIN, data, f"paths.log_dir={root / 'logs-nodes'}",
             f"hydra.run.dir={root / 'nodes'}"],
            root / f"nodes{rank}.log",
        )
        procs[f"describe{rank}"] = _torchrun(
            rank, describe_port, [str(Path(__file__).resolve()), "describe", str(root / "describe")],
            root / f"describe{rank}.log",
        )
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=600)
            assert rc == 0, f"{name} failed:\n{(root / f'{name}.log').read_text()[-3000:]}"
        yield root
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_nodes_describe_every_image_exactly_once(runs: Path) -> None:
    """The ranks of the two nodes describe disjoint strided shards, together every image once,
    and each ends with all descriptors in dataset order (n = 1 leaves node 1 an empty shard)."""
    for n in SIZES:
        shards = [np.load(runs / "describe" / f"n{n}-rank{rank}.npz") for rank in range(NODES)]
        for rank, shard in enumerate(shards):
            np.testing.assert_array_equal(shard["described"], np.arange(rank, n, NODES))
        described = np.concatenate([s["described"] for s in shards])
        np.testing.assert_array_equal(np.sort(described), np.arange(n))  # all of them, none twice
        for shard in shards:
            np.testing.assert_array_equal(shard["descriptors"][:, 0], np.arange(n, dtype=np.float16))
            np.testing.assert_array_equal(shard["valid"], [i % 3 != 2 for i in range(n)])


def test_two_nodes_run_as_one_job(runs: Path) -> None:
    """Lightning saw both nodes as one world; only global rank 0 wrote the run's files."""
    assert "Starting with 2 processes" in (runs / "nodes0.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (runs / "nodes1.log").read_text()
    assert sorted(p.name for p in (runs / "nodes" / "checkpoints").iterdir()) == ["best.ckpt", "round0.ckpt", "round1.ckpt"]
    assert not list((runs / "nodes").glob(".write_test*"))
    assert (runs / "nodes0.log").read_text().count("run directory:") == 1
    assert "run directory:" not in (runs / "nodes1.log").read_text()


def test_two_nodes_mine_the_tuples_of_one_process(runs: Path) -> None:
    """Round 1 is mined from the network trained for a round, by global rank 0, broadcast to
    node 1: its tuples and the miner's memory are those of the 1-process run."""
    for name in ("round0.ckpt", "round1.ckpt"):
        single = _load(runs / "single" / "checkpoints" / name)["mining"]
        nodes = _load(runs / "nodes" / "checkpoints" / name)["mining"]
        assert int(single["round"]["index"]) == int(nodes["round"]["index"]) == 1
        assert len(nodes["round"]["query"]) > 0
        for key in ("query", "hard_positive", "negatives", "positives"):
            assert torch.equal(single["round"][key], nodes["round"][key]), (name, key)
        for key in ("queries", "negatives"):
            assert torch.equal(single["negatives"][key], nodes["negatives"][key]), (name, key)


def test_two_nodes_train_to_the_weights_of_one_process(runs: Path) -> None:
    """2 nodes x 1 tuple per step = 1 process x 2 tuples per step, up to float32 rounding.

    Equal in exact arithmetic because: every loss is a mean over the tuples of a step and DDP
    averages the ranks' gradients; BatchNorm is frozen (``module.freeze_batchnorm=true``: in
    batch-statistics mode a tuple's output would depend on the other tuples of its rank, and
    SyncBatchNorm, which restores the 1-process statistics on GPUs, has no CPU kernel); rank r
    trains tuples r, r + 2, ... of each round, i.e. step k trains the tuples 2k, 2k + 1 of the
    1-process run; each tuple's colour jitter is seeded by (seed, round, tuple) alone; both
    start from the same seeded weights and centroids. Not bit-equal: DDP sums two per-rank
    gradients and halves them where one process backpropagates a batch of two through batched
    convolutions, so sums are associated differently. Measured after 6 SGD steps (lr 1e-3):
    max |difference| 4.4e-7 on weights of magnitude up to 13.5; asserted <= 1e-5.
    """
    single = _load(runs / "single" / "checkpoints" / "round1.ckpt")
    nodes = _load(runs / "nodes" / "checkpoints" / "round1.ckpt")
    assert single["global_step"] == nodes["global_step"] == 6
    moved = []
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(nodes["state_dict"][key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)
    for state in single["optimizer_states"][0]["state"].values():  # training did move the weights
        moved.append(float(state["momentum_buffer"].abs().max()))
    assert max(moved) > 100 * WEIGHT_ATOL


def test_two_nodes_evaluate_as_one_process(runs: Path, tiny_data_dir: Path) -> None:
    """eval.py under torchrun on 2 nodes: the images (PCA's and the split's) are described in
    shards, global rank 0 alone writes the results, which are those of one process."""
    one = runs / "eval-one"
    evaluate.run(compose_cfg("eval", EVAL, tiny_data_dir, one))
    results = [json.loads((run / "results.json").read_text()) for run in (one, runs / "eval")]
    assert results[0]["recall"] == results[1]["recall"]
    for key in ("topk", "distances"):
        np.testing.assert_allclose(*(np.load(run / "predictions.npz")[key] for run in (one, runs / "eval")), atol=1e-5)
    assert "results written to" in (runs / "eval0.log").read_text()
    assert "results written to" not in (runs / "eval1.log").read_text()


def test_submitit_local_launcher_runs_a_job(runs: Path) -> None:
    """``python train.py -m hydra/launcher=submitit_local ...``: the job ran in a process of
    submitit's (its log and result files) and wrote its checkpoints into the sweep."""
    job = runs / "sweep" / "0"
    ckpt = _load(job / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    results = list((runs / "sweep" / ".submitit").glob("*/*_0_result.pkl"))
    assert results, "no submitit job result"
    assert f"run directory: {job}" in "".join(p.read_text() for p in results[0].parent.glob("*_0_log.out"))


def test_slurm_launcher_maps_nodes_and_tasks_to_the_trainer() -> None:
    """hydra/launcher=slurm asks SLURM for trainer.num_nodes nodes of trainer.devices tasks and
    GPUs each, as Hydra instantiates the launcher (its parameters resolved); eval.py, without
    a trainer, for one task and no GPU."""
    import hydra as hydra_api

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp_multinode", "trainer.devices=8", "trainer.num_nodes=3",
                       "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (3, 8, 8)
    made = hydra_api.utils.instantiate(cfg.hydra.launcher)
    assert (made.params["nodes"], made.params["tasks_per_node"], made.params["partition"]) == (3, 8, "gpu")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):  # no trainer: 1 task, no GPU
        launcher = compose(config_name="eval", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, None)


# ------------------------------------------------------------ without launching processes
def _datamodule(data_dir: Path) -> TupleDataModule:
    root = data_dir / "synthcity" / "raw"
    datamodule = TupleDataModule({"kind": "synthcity", "root": str(root), "splits": {"train": "train", "val": "val"}},
                                 image_size=(16, 16), pos_num=1, neg_num=1, num_workers=0, seed=3)
    datamodule.setup()
    datamodule.serve_round(2, [MinedTuple(q, q, np.array([q + 1]), np.array([q])) for q in range(6)])
    return datamodule


def _on_rank(datamodule: TupleDataModule, rank: int, world: int) -> TupleDataModule:
    datamodule.trainer = SimpleNamespace(  # what train_dataloader asks of a DDP trainer
        distributed_sampler_kwargs={"num_replicas": world, "rank": rank},
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    return datamodule


def test_each_rank_trains_every_world_th_tuple_of_the_round(tiny_data_dir: Path) -> None:
    """Rank r of 2 takes tuples r, r + 2, ..., in the round's order: its step k holds the
    tuples the 1-process run (2 tuples per step) trains at step k."""
    datamodule = _datamodule(tiny_data_dir)
    for rank in range(2):
        loader = _on_rank(datamodule, rank, 2).train_dataloader()
        assert list(loader.sampler) == list(range(rank, 6, 2))
    datamodule.trainer = None  # one process: the round in order, all of it
    assert isinstance(datamodule.train_dataloader().sampler, SequentialSampler)


def test_a_tuple_draws_its_own_jitter_wherever_it_is_loaded(tiny_data_dir: Path) -> None:
    """Colour jitter of tuple i depends on (seed, round, i) only: the same on any rank, in any
    order, different between tuples; and the caller's random stream is left alone."""
    one = _datamodule(tiny_data_dir).train_dataloader().dataset
    rank1 = _on_rank(_datamodule(tiny_data_dir), 1, 2).train_dataloader().dataset
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    backwards = [rank1[i][0] for i in (5, 3, 1)]
    assert torch.equal(torch.rand(1), expected_next)
    for i, images in zip((5, 3, 1), backwards, strict=True):
        assert torch.equal(one[i][0], images)
    # Database image 1: tuple 0's negative, tuple 1's hard positive; jittered differently.
    assert not torch.equal(one[0][0][2], one[1][0][1])


def test_only_global_rank_zero_mines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank other than 0 never mines: it takes rank 0's tuples and miner memory; an error of
    rank 0's mining is raised on every rank instead of leaving them waiting."""
    monkeypatch.setattr(mining_rounds, "extract_descriptors", lambda *args, **kwargs: None)
    served = []
    datamodule = SimpleNamespace(
        train_images=lambda: None, eval_batch_size=2, num_workers=0,
        serve_round=lambda index, tuples: served.append((index, tuples)),
    )
    module = SimpleNamespace(mining_net=lambda round_index: None, device=torch.device("cpu"))
    rank0 = ([MinedTuple(4, 1, np.array([2]), np.array([1]))], {4: np.array([2])})
    callbacks = []
    for broadcast, expected in ((rank0, None), ("query 4 has only 0 negative candidates", "only 0 negative")):
        trainer = SimpleNamespace(datamodule=datamodule, is_global_zero=False,
                                  strategy=SimpleNamespace(broadcast=lambda obj, src, b=broadcast: b))
        callback = mining_rounds.TupleMining()
        callback.miner = SimpleNamespace(mine=lambda *a, **k: pytest.fail("rank 1 mined"), last_negatives={})
        callbacks.append(callback)
        if expected is None:
            callback.mine(trainer, module, 3)
        else:
            with pytest.raises(ValueError, match=expected):
                callback.mine(trainer, module, 3)
    assert served == [(3, rank0[0])] and callbacks[0].miner.last_negatives == rank0[1]


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_torchrun_needs_one_run_directory(mode: RunMode, monkeypatch: pytest.MonkeyPatch) -> None:
    hydra_cfg = OmegaConf.create({
        "mode": mode,
        "run": {"dir": "logs/train/runs/${now:%Y-%m-%d_%H-%M-%S}"},
        "sweep": {"dir": "logs/train/multiruns/${now:%Y-%m-%d_%H-%M-%S}"},
    })
    check_shared_run_dir(hydra_cfg)  # one process: the default is fine
    _torchrun_env(monkeypatch, 2)
    key = "hydra.sweep.dir" if mode == RunMode.MULTIRUN else "hydra.run.dir"
    with pytest.raises(ValueError, match=f"torchrun started 2 processes .*pass {re.escape(key)}=DIR"):
        check_shared_run_dir(hydra_cfg)
    check_shared_run_dir(OmegaConf.merge(hydra_cfg, {"run": {"dir": "/runs/a"}, "sweep": {"dir": "/runs/a"}}))


def test_processes_must_match_devices_times_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_job.HydraConfig, "initialized", staticmethod(lambda: False))
    cfg = OmegaConf.create({"trainer": {"devices": 1, "num_nodes": 1}})
    train_job.check_launch(cfg)  # one process
    _torchrun_env(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"trainer.devices=1 x trainer.num_nodes=1 = 1"):
        train_job.check_launch(cfg)
    train_job.check_launch(OmegaConf.create({"trainer": {"devices": 1, "num_nodes": 2}}))


def test_several_processes_do_not_render_the_city_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun_env(monkeypatch, 2)
    dataset = OmegaConf.create({"kind": "synthcity", "root": str(tmp_path / "data" / "synthcity" / "raw"),
                                "generate": {"preset": "tiny", "seed": 0}})
    with pytest.raises(ValueError, match=r"python -m wakd.synth.synthcity --out .* --preset tiny --seed 0"):
        ensure_dataset(dataset)
    assert not (tmp_path / "data").exists()


def _describe_shards(out_dir: Path) -> None:
    """Under torchrun: describe each size of SIZES on this rank, saving which images this
    rank's network described and the gathered result."""
    import torch.distributed as dist

    from wakd.describe import extract_descriptors

    class Recording(Describe):
        def __init__(self) -> None:
            super().__init__()
            self.described: list[int] = []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out = super().forward(images)
            self.described += out[:, 0].round().long().tolist()  # column 0: the image's index
            return out

    dist.init_process_group("gloo")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for n in SIZES:
            net = Recording()
            result = extract_descriptors(net, IndexImages(n), batch_size=2, num_workers=0, progress=False, optimize=False)
            np.savez(out_dir / f"n{n}-rank{dist.get_rank()}.npz", descriptors=result.descriptors, valid=result.valid,
                     described=np.asarray(net.described, dtype=np.int64))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # torchrun ... tests/test_multinode.py describe OUT_DIR
    _describe_shards(Path(sys.argv[2]))
