"""Tuple mining, the step before every training round: describe -> mine -> re-rank.

The current network describes every training query and database image, each round query
gets its tuple (nearest positive, hardest negatives, soft-loss positives: ``TupleMiner``,
re-ranked from SFRS generation 1 on) and the datamodule serves the round's tuples.

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
from wakd.describe import extract_descriptors, split_descriptors

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
        split = datamodule.train_split
        extraction = extract_descriptors(
            pl_module.net_at_round_start(round_index),
            datamodule.train_images(),
            batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            device=pl_module.device,
            desc=f"mining round {round_index}",
        )
        q_desc, db_desc = split_descriptors(extraction, [split.num_queries, split.num_db])
        # SFRS re-ranks the positives from generation 1 on.
        rerank = datamodule.rerank_positives and pl_module.schedule.generation_of(round_index) >= 1
        rng = np.random.default_rng([datamodule.seed, 1_000_003, round_index])
        tuples = datamodule.miner.mine(
            datamodule.round_queries(round_index), q_desc, db_desc, rng, rerank=rerank, device=pl_module.device
        )
        datamodule.serve_round(round_index, tuples)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: PlaceModule, checkpoint: dict) -> None:
        # For checkpoints without this callback's state (written before it existed), all
        # written at the end of their epoch; load_state_dict, called next, overrides it.
        self.next_round = int(checkpoint["epoch"]) + 1

    def state_dict(self) -> dict[str, int]:
        return {"next_round": self.next_round}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.next_round = int(state_dict["next_round"])
