"""Mining rounds: which round TupleMining mines when, the rounds' state in checkpoints, and
validation descriptors put back in image order."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wakd.data.datamodule import TupleDataModule
from wakd.data.tuple_miner import MinedTuple
from wakd.describe import in_image_order
from wakd.modules.mining_rounds import TupleMining


class _Served:
    """The part of TupleDataModule that TupleMining's scheduling looks at."""

    def __init__(self) -> None:
        self.mined_round: int | None = None

    def build_miner(self) -> SimpleNamespace:
        return SimpleNamespace(last_negatives={})

    def serve_round(self, round_index: int, tuples: list[MinedTuple]) -> None:
        self.mined_round = round_index


def _mining(monkeypatch: pytest.MonkeyPatch, next_round: int = 0) -> tuple[TupleMining, list[int]]:
    mined: list[int] = []

    def mine(self: TupleMining, trainer: SimpleNamespace, pl_module: object, round_index: int) -> None:
        mined.append(round_index)
        self.mined = (round_index, [])
        trainer.datamodule.serve_round(round_index, [])

    monkeypatch.setattr(TupleMining, "mine", mine)
    callback = TupleMining()
    callback.next_round = next_round
    return callback, mined


def _through_checkpoint(callback: TupleMining, epoch: int = 0) -> TupleMining:
    """A fresh callback restored from what ``callback`` saves, read back with weights_only=True."""
    checkpoint: dict = {"epoch": epoch}
    callback.on_save_checkpoint(None, None, checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    restored = TupleMining()
    restored.on_load_checkpoint(None, None, torch.load(buffer, weights_only=True))
    return restored


def test_each_round_is_mined_once_before_it_is_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    callback, mined = _mining(monkeypatch)
    trainer = SimpleNamespace(datamodule=_Served(), max_epochs=3, current_epoch=0)
    callback.on_fit_start(trainer, None)
    for epoch in range(3):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)
    assert mined == [0, 1, 2]  # nothing after the last round
    assert callback.next_round == 3


@pytest.mark.parametrize(("served", "expected"), [(2, []), (1, [2])], ids=["tuples-in-checkpoint", "tuples-missing"])
def test_a_resumed_fit_mines_only_a_round_its_checkpoint_lacks(
    served: int, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written between rounds holds the next round's tuples; one written after
    the last round of a shorter run (resumed with more rounds) does not."""
    callback, mined = _mining(monkeypatch, next_round=2)
    callback.mined = (served, [])
    restored = _through_checkpoint(callback)
    datamodule = _Served()
    restored.on_fit_start(SimpleNamespace(datamodule=datamodule, max_epochs=4, current_epoch=0), None)
    assert mined == expected
    assert datamodule.mined_round == 2


def test_a_checkpoint_without_the_round_counter_resumes_after_its_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    callback, mined = _mining(monkeypatch)
    callback.on_load_checkpoint(None, None, {"epoch": 4})  # written at the end of round 4
    callback.on_fit_start(SimpleNamespace(datamodule=_Served(), max_epochs=8, current_epoch=0), None)
    assert mined == [5]


def test_served_round_survives_a_weights_only_checkpoint(tiny_data_dir: Path) -> None:
    root = tiny_data_dir / "synthcity" / "raw"
    datamodule = TupleDataModule({"kind": "synthcity", "root": str(root), "splits": {"train": "train", "val": "val"}},
                                 image_size=(8, 8), pos_num=2, neg_num=3, num_workers=0)
    datamodule.setup()
    tuples = [MinedTuple(q, q + 1, np.array([5, 6, 7]), np.array([q + 1, q + 2])) for q in (3, 0, 9)]
    callback = TupleMining()
    callback.next_round, callback.mined = 4, (4, tuples)
    callback.last_negatives = {3: np.array([5, 6, 7]), 9: np.array([1, 2, 8])}
    restored = _through_checkpoint(callback)
    restored.on_fit_start(SimpleNamespace(datamodule=datamodule), None)  # serves round 4: no mining
    assert datamodule.mined_round == 4
    for a, b in zip(datamodule.train_dataloader().dataset.tuples, tuples, strict=True):
        assert (a.query, a.hard_positive) == (b.query, b.hard_positive)
        assert a.negatives.tolist() == b.negatives.tolist() and a.positives.tolist() == b.positives.tolist()
    assert {q: n.tolist() for q, n in restored.miner.last_negatives.items()} == {3: [5, 6, 7], 9: [1, 2, 8]}


def test_validation_descriptors_in_image_order_each_once() -> None:
    """Two ranks of a padding sampler over 5 images: rank 0 saw 0, 2, 4, rank 1 saw 1, 3, 0."""
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    descriptors = index[:, None].repeat(1, 3).half()  # a row identifies its image
    valid = torch.tensor([True, True, False, True, True, True])
    rows, ok = in_image_order(index, descriptors, valid, total=5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5, dtype=np.float16))
    assert ok.tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match="descriptors of 4 of 5 images"):
        in_image_order(index[:4], descriptors[:4], valid[:4], total=5)
