"""Tuple mining, the step before every training round: describe -> mine -> re-rank.

The current network describes every training query and database image, each round query
gets its tuple (nearest positive, hardest negatives, soft-loss positives: ``TupleMiner``,
re-ranked from SFRS generation 1 on) and the datamodule serves the round's tuples.
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

from typing import TYPE_CHECKING

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from wakd.data.datamodule import TupleDataModule
from wakd.data.mining import MinedTuple
from wakd.describe import Extraction, extract_descriptors, split_descriptors

if TYPE_CHECKING:
    from wakd.modules.place_module import PlaceModule


class TupleMining(Callback):
    """Mines each round of a ``PlaceModule`` fit once, before Lightning asks for its loader."""

    def __init__(self) -> None:
        self.next_round = 0  # the round the fit trains next

    def on_fit_start(self, trainer: L.Trainer, pl_module: PlaceModule) -> None:
        # A checkpoint written between rounds brought the next round's tuples along.
        if trainer.datamodule.mined_round != self.next_round:
            self.mine(trainer, pl_module, self.next_round)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: PlaceModule) -> None:
        self.next_round = trainer.current_epoch + 1
        if trainer.max_epochs is None or self.next_round < trainer.max_epochs:
            self.mine(trainer, pl_module, self.next_round)

    def mine(self, trainer: L.Trainer, pl_module: PlaceModule, round_index: int) -> None:
        """Describe every training image with the network round ``round_index`` starts
        from, mine the round's tuples and hand them to the datamodule."""
        datamodule: TupleDataModule = trainer.datamodule
        extraction = extract_descriptors(
            pl_module.mining_net(round_index),
            datamodule.train_images(),
            batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            device=pl_module.device,
            desc=f"mining round {round_index}",
        )
        # Every rank holds every descriptor now, but only global rank 0 mines: ranks on other
        # machines (other CPUs, faiss builds, GPUs) could break near-ties differently and
        # train on tuples that do not fit together. Its tuples and the miner's memory go to
        # all ranks, so every rank serves the same round and holds the same state.
        mined: tuple[list[MinedTuple], dict] | str | None = None
        if trainer.is_global_zero:
            try:
                mined = self._mine_round(datamodule, pl_module, round_index, extraction)
            except ValueError as exc:  # raised on every rank below: no rank waits for tuples forever
                mined = str(exc)
        mined = trainer.strategy.broadcast(mined, src=0)
        if isinstance(mined, str):
            raise ValueError(mined)
        tuples, miner_state = mined
        if not trainer.is_global_zero:
            datamodule.miner.load_state_dict(miner_state)
        datamodule.serve_round(round_index, tuples)

    @staticmethod
    def _mine_round(
        datamodule: TupleDataModule, pl_module: PlaceModule, round_index: int, extraction: Extraction
    ) -> tuple[list[MinedTuple], dict]:
        """The tuples of round ``round_index`` from this round's descriptors, and the miner's memory after it."""
        split = datamodule.train_split
        q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
        # SFRS re-ranks the positives from generation 1 on.
        rerank = datamodule.rerank_positives and pl_module.schedule.generation_of(round_index) >= 1
        rng = np.random.default_rng([datamodule.seed, 1_000_003, round_index])
        tuples = datamodule.miner.mine(
            datamodule.round_queries(round_index), q_desc, db_desc, rng, rerank=rerank, device=pl_module.device
        )
        return tuples, datamodule.miner.state_dict()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: PlaceModule, checkpoint: dict) -> None:
        # For checkpoints without this callback's state (written before it existed), all
        # written at the end of their epoch; load_state_dict, called next, overrides it.
        self.next_round = int(checkpoint["epoch"]) + 1

    def state_dict(self) -> dict[str, int]:
        return {"next_round": self.next_round}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.next_round = int(state_dict["next_round"])
