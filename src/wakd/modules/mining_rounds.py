"""Tuple mining, the step before every training round: describe -> mine -> re-rank.

The current network describes every training query and database image, each round query
gets its tuple (nearest positive, hardest negatives, soft-loss positives: ``TupleMiner``,
re-ranked from SFRS generation 1 on) and the datamodule serves the round's tuples.
:class:`TupleMining` owns the state of the rounds (the round that comes next, its tuples,
the miner's memory of each query's last negatives) and alone puts it in checkpoints.
Under DDP, on one node or several, every rank describes a strided shard of the images
(``wakd.describe``), global rank 0 mines and broadcasts the tuples, and Lightning's
DistributedSampler gives rank r the round's tuples r, r + world, ...

When it runs: Lightning asks for an epoch's train loader, and for the first epoch of a
fit already iterates it, before ``on_train_epoch_start`` (``FitLoop.setup_data`` in
``run`` and ``on_advance_start``), so a round cannot be mined at its own start. Round
r + 1 is mined at the end of round r (``on_train_epoch_end``, before the checkpoint
callbacks: a checkpoint then holds the tuples of the round to come, and a resumed run
trains on them without mining again), and the first round of a fit at ``on_fit_start``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from wakd.data.datamodule import TupleDataModule, tuples_from_tensors, tuples_to_tensors
from wakd.data.tuple_miner import MinedTuple, TupleMiner
from wakd.describe import Extraction, extract_descriptors, split_descriptors
from wakd.zoo import ZooTeacher

# The checkpoint entry of the mining state.
CHECKPOINT_KEY = "mining"


class TupleMining(Callback):
    """Mines each round of a fit once, before Lightning asks for its loader, and keeps the
    rounds' state. The LightningModule brings it along and provides ``mining_net(round)``,
    the network that describes the images of a round, and ``schedule.generation_of``."""

    def __init__(self) -> None:
        self.next_round = 0  # the round the fit trains next
        self.miner: TupleMiner | None = None  # built from the datamodule at fit start
        self.last_negatives: dict[int, np.ndarray] = {}  # restored before the miner exists
        self.mined: tuple[int, list[MinedTuple]] | None = None  # the last round mined

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: TupleDataModule = trainer.datamodule
        self.miner = datamodule.build_miner()
        self.miner.last_negatives = self.last_negatives
        # A checkpoint written between rounds brought the next round's tuples along.
        if self.mined is not None and self.mined[0] == self.next_round:
            datamodule.serve_round(*self.mined)
        else:
            self.mine(trainer, pl_module, self.next_round)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.next_round = trainer.current_epoch + 1
        if trainer.max_epochs is None or self.next_round < trainer.max_epochs:
            self.mine(trainer, pl_module, self.next_round)

    def mine(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int) -> None:
        """Describe every training image with the network round ``round_index`` starts
        from, mine the round's tuples and hand them to the datamodule."""
        datamodule: TupleDataModule = trainer.datamodule
        net = pl_module.mining_net(round_index)
        extraction = extract_descriptors(
            net,
            datamodule.train_images(),
            batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            device=pl_module.device,
            desc=f"mining round {round_index}",
            # A published teacher's antialiased resize has no ONNX export: eager PyTorch at once.
            optimize=not isinstance(net, ZooTeacher),
        )
        # Every rank holds every descriptor now, but only global rank 0 mines: ranks on other
        # machines (other CPUs, faiss builds, GPUs) could break near-ties differently and
        # train on tuples that do not fit together. Its tuples and the miner's memory go to
        # all ranks, so every rank serves the same round and holds the same state.
        mined: tuple[list[MinedTuple], dict[int, np.ndarray]] | str | None = None
        if trainer.is_global_zero:
            try:
                mined = self._mine_round(datamodule, pl_module, round_index, extraction)
            except ValueError as exc:  # raised on every rank below: no rank waits for tuples forever
                mined = str(exc)
        mined = trainer.strategy.broadcast(mined, src=0)
        if isinstance(mined, str):
            raise ValueError(mined)
        tuples, self.miner.last_negatives = mined
        self.last_negatives = self.miner.last_negatives
        self.mined = (round_index, tuples)
        datamodule.serve_round(round_index, tuples)

    def _mine_round(
        self, datamodule: TupleDataModule, pl_module: L.LightningModule, round_index: int, extraction: Extraction
    ) -> tuple[list[MinedTuple], dict[int, np.ndarray]]:
        """The tuples of round ``round_index`` from this round's descriptors, and the miner's memory after it."""
        split = datamodule.train_split
        q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
        # SFRS re-ranks the positives from generation 1 on.
        rerank = datamodule.rerank_positives and pl_module.schedule.generation_of(round_index) >= 1
        rng = np.random.default_rng([datamodule.seed, 1_000_003, round_index])
        tuples = self.miner.mine(
            datamodule.round_queries(round_index), q_desc, db_desc, rng, rerank=rerank, device=pl_module.device
        )
        return tuples, self.miner.last_negatives

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Tensors, not arrays: checkpoints are read back with ``weights_only=True``. A
        checkpoint written between rounds holds the next round's tuples, so a resumed run
        trains on them without mining again."""
        state: dict[str, Any] = {"next_round": self.next_round, "negatives": negatives_to_tensors(self.last_negatives)}
        if self.mined is not None:
            state["round"] = {"index": self.mined[0], **tuples_to_tensors(self.mined[1])}
        checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:  # written before this state existed, at the end of its epoch
            self.next_round = int(checkpoint["epoch"]) + 1
            return
        self.next_round = int(state["next_round"])
        self.last_negatives = negatives_from_tensors(state["negatives"])
        if "round" in state:
            self.mined = (int(state["round"]["index"]), tuples_from_tensors(state["round"]))


def negatives_to_tensors(last_negatives: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
    """The miner's memory as int64 tensors: queries [M] and their last negatives [M, neg_num]."""
    queries = sorted(last_negatives)
    negatives = [torch.from_numpy(np.asarray(last_negatives[q], dtype=np.int64)) for q in queries]
    return {
        "queries": torch.tensor(queries, dtype=torch.int64),
        "negatives": torch.stack(negatives) if negatives else torch.empty((0, 0), dtype=torch.int64),
    }


def negatives_from_tensors(state: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    return {int(q): n.numpy().astype(np.int64) for q, n in zip(state["queries"], state["negatives"], strict=True)}
