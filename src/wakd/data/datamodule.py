"""LightningDataModule of weakly supervised training tuples.

One Lightning epoch is one *mining round*: ``cache_size`` training queries. Before each
round the current model re-describes all training queries and database images and the
round's tuples are mined from those descriptors, as OpenIBL does every 1,000 queries:
that step is :class:`wakd.modules.mining_rounds.TupleMining`, on the training side, which
also keeps the rounds' state. This module holds what mining needs from the data (the
splits, the miner's settings, each round's queries) and serves the tuples it is handed
(``serve_round``), reloaded every round (``reload_dataloaders_every_n_epochs=1``). Validation batches are the val split's
queries then database images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from wakd.data.datasets import PlaceSplit, load_split
from wakd.data.images import ConcatImages, ImageListDataset, build_transform, extraction_loader
from wakd.data.tuple_miner import MinedTuple, TupleMiner


class TupleDataset(Dataset):
    """Mined tuples: images ``[T, 3, H, W]`` and their global image ids ``[T]`` per item.

    T = 2 + neg_num + pos_num, in the reference's order: anchor query, hard-loss positive,
    negatives, then the soft-loss positives (the nearest positive may appear twice, as in
    the reference, when it is also a soft-loss positive). A global id indexes
    the split's queries followed by its database images, the order of :func:`split_images`
    (and so of the mining descriptors and the teacher cache): query q is q, database
    image j is ``num_queries + j``.

    Random augmentation of item i is seeded by ``(*seed, i)`` alone, so a tuple looks the
    same whichever process, DataLoader worker or batch it lands in: a run on several
    processes or nodes draws the jitter of a 1-process run, ranks do not repeat each
    other's draws, and a resumed run repeats them.
    """

    def __init__(
        self,
        split: PlaceSplit,
        tuples: Sequence[MinedTuple],
        transform: Any,
        skip_corrupt: bool,
        seed: Sequence[int] = (0,),
    ) -> None:
        self.tuples = list(tuples)
        self.num_queries = split.num_queries
        self.queries = ImageListDataset(split.q_paths, transform, skip_corrupt=skip_corrupt)
        self.database = ImageListDataset(split.db_paths, transform, skip_corrupt=skip_corrupt)
        self.seed = tuple(int(s) for s in seed)

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tuples[i]
        db = np.concatenate([[t.hard_positive], t.negatives, t.positives]).astype(np.int64)
        item_seed = int(np.random.SeedSequence([*self.seed, i]).generate_state(1, np.uint64)[0])
        # torchvision's ColorJitter draws from the global generator: fork it, so that the
        # caller's random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            images = [self.queries[t.query][0]] + [self.database[int(j)][0] for j in db]
        ids = torch.from_numpy(np.concatenate([[t.query], db + self.num_queries]).astype(np.int64))
        return torch.stack(images), ids


def split_images(
    split: PlaceSplit, transform: Any, skip_corrupt: bool = False, query_transform: Any = None
) -> ConcatImages:
    """Queries followed by database images, for one extraction pass; item indices count
    across both (database image j is ``num_queries + j``). ``query_transform``: the
    queries' own (Tokyo 24/7's query resizing), else ``transform``."""
    return ConcatImages(
        [
            ImageListDataset(split.q_paths, query_transform or transform, skip_corrupt=skip_corrupt),
            ImageListDataset(split.db_paths, transform, skip_corrupt=skip_corrupt),
        ]
    )


class TupleDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: dict,
        image_size: Sequence[int] = (480, 640),
        pos_num: int = 3,
        neg_num: int = 3,
        pos_pool: int = 20,
        neg_pool: int = 1000,
        cache_size: int = 1000,
        tuples_per_batch: int = 1,
        num_workers: int = 2,
        eval_batch_size: int = 16,
        augment: bool = True,
        skip_corrupt: bool = False,
        seed: int = 0,
        rerank_positives: bool = True,
        rerank_k1: int = 20,
        rerank_k2: int = 1,
        rerank_lambda: float = 0.1,
        rerank_select: str = "gain",
    ) -> None:
        super().__init__()
        self.dataset_cfg = dict(dataset)
        self.image_size = tuple(image_size)
        self.pos_num = pos_num
        self.miner_args = dict(
            pos_num=pos_num, neg_num=neg_num, pos_pool=pos_pool, neg_pool=neg_pool,
            rerank_k1=rerank_k1, rerank_k2=rerank_k2, rerank_lambda=rerank_lambda, rerank_select=rerank_select,
        )
        self.rerank_positives = rerank_positives
        self.cache_size = cache_size
        self.tuples_per_batch = tuples_per_batch
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size
        self.skip_corrupt = skip_corrupt
        self.seed = seed
        self.train_transform = build_transform(self.image_size, train=augment)
        self.eval_transform = build_transform(self.image_size, train=False)
        self.train_split: PlaceSplit | None = None
        self.val_split: PlaceSplit | None = None
        self.train_queries: np.ndarray | None = None  # those with a positive within 10 m
        self._round: tuple[int, list[MinedTuple]] | None = None  # (round index, its mined tuples)

    def _load(self, split: str) -> PlaceSplit:
        cfg = self.dataset_cfg
        return load_split(
            cfg["kind"], cfg["root"], cfg["splits"][split],
            scale=cfg.get("scale"), pos_dist_thr=cfg.get("pos_dist_thr"),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is None:
            self.train_split = self._load("train")
            self.val_split = self._load("val")
            self.train_queries = self.train_split.queries_with_train_positive()

    def build_miner(self) -> TupleMiner:
        """The tuple miner of the training split, with this datamodule's settings."""
        assert self.train_split is not None, "call setup() first"
        return TupleMiner(self.train_split, **self.miner_args)

    @property
    def rounds_per_pass(self) -> int:
        """Mining rounds per pass over the training queries."""
        assert self.train_queries is not None, "call setup() first"
        return math.ceil(len(self.train_queries) / self.cache_size)

    def round_queries(self, round_index: int) -> np.ndarray:
        """The queries of one mining round: a seeded shuffle per pass, cut in cache_size pieces."""
        pass_index, within = divmod(round_index, self.rounds_per_pass)
        order = np.random.default_rng([self.seed, pass_index]).permutation(self.train_queries)
        return order[within * self.cache_size : (within + 1) * self.cache_size]

    @property
    def mined_round(self) -> int | None:
        """Index of the round whose tuples ``train_dataloader`` serves (None before the first)."""
        return self._round[0] if self._round is not None else None

    def serve_round(self, round_index: int, tuples: Sequence[MinedTuple]) -> None:
        """The tuples of round ``round_index``, served from the next ``train_dataloader`` on."""
        self._round = (round_index, list(tuples))

    def train_dataloader(self) -> DataLoader:
        if self._round is None or self.train_split is None:
            raise RuntimeError("no mined round to serve: the TupleMining callback mines each round before training it")
        round_index, tuples = self._round
        dataset = TupleDataset(
            self.train_split, tuples, self.train_transform, self.skip_corrupt, seed=(self.seed, round_index)
        )
        return DataLoader(
            dataset,
            batch_size=self.tuples_per_batch,
            sampler=self._train_sampler(dataset),
            num_workers=self.num_workers,
            pin_memory=self._device().type == "cuda",
        )

    def _train_sampler(self, dataset: TupleDataset) -> Sampler | None:
        """In order: the round's queries are already a seeded permutation. Under DDP (any
        number of nodes) rank r of w takes tuples r, r + w, ..., so that each step trains on
        the tuples a 1-process run with w times the batch takes together; left to itself,
        Lightning would shuffle them with a DistributedSampler seeded per epoch, and a run's
        tuples per step would depend on its number of processes. The last step repeats the
        first tuples where w does not divide the round (DistributedSampler's padding)."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs or kwargs["num_replicas"] == 1:
            return None
        return DistributedSampler(dataset, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"], shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """Val queries then database images, items (uint8 image, index in the split's images, valid)."""
        return extraction_loader(
            self.val_images(), batch_size=self.eval_batch_size, num_workers=self.num_workers, device=self._device()
        )

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_images(self) -> Dataset:
        """Training queries then database images, un-augmented (the teacher cache's view)."""
        assert self.train_split is not None
        return split_images(self.train_split, self.eval_transform, self.skip_corrupt)

    def val_images(self) -> Dataset:
        assert self.val_split is not None
        return split_images(self.val_split, self.eval_transform, self.skip_corrupt)


def tuples_to_tensors(tuples: Sequence[MinedTuple]) -> dict[str, torch.Tensor]:
    """Mined tuples as int64 columns, for checkpoints: tensors, not arrays, since they are
    read back with ``weights_only=True``."""

    def column(values: list) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64))

    return {
        "query": column([t.query for t in tuples]),  # [M]
        "hard_positive": column([t.hard_positive for t in tuples]),  # [M]
        "negatives": column([t.negatives for t in tuples]),  # [M, neg_num]
        "positives": column([t.positives for t in tuples]),  # [M, pos_num]
    }


def tuples_from_tensors(state: dict[str, torch.Tensor]) -> list[MinedTuple]:
    """The tuples :func:`tuples_to_tensors` stored."""
    return [
        MinedTuple(int(q), int(p), n.numpy(), s.numpy())
        for q, p, n, s in zip(state["query"], state["hard_positive"], state["negatives"], state["positives"], strict=True)
    ]
