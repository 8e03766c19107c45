"""An endless, seeded, resumable stream of prompt batches, split across data-parallel ranks.

The stream walks through global batches numbered 0, 1, 2, ... without end. Global batch ``k`` is
batch ``k mod B`` of epoch ``k // B`` (``B = len(items) // global_batch_size`` batches per epoch; the
last partial batch of an epoch is dropped so that every epoch has the same number of batches). Each
epoch visits the items in a permutation seeded by ``(seed, epoch)``, so epochs differ and a rerun
repeats them. Rank ``r`` of ``W`` gets the items ``r, r + W, r + 2W, ...`` of each global batch:
ranks see disjoint prompts and together the whole global batch, and any contiguous block of ``M``
global positions (``M`` a multiple of ``W``) is a contiguous block of ``M / W`` items on every rank —
so a mini-batch of the global batch is the same set of prompts on any number of ranks
(:mod:`archer.micro_batches`).

Its position (``batches_delivered``) is the only state: after ``load_state_dict`` the next batch
yielded is global batch ``batches_delivered``, exactly as in an uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

__all__ = ["PromptStream", "STREAM_INDEX_KEY"]

STREAM_INDEX_KEY = "stream_index"
"""Key added to every item of a yielded batch: the global batch's 0-based index in the stream."""


class PromptStream(IterableDataset):
    """Yields, per global batch, this rank's list of items (each a dict, copied and tagged with
    ``STREAM_INDEX_KEY``). Use it with ``DataLoader(batch_size=None, num_workers=0)``: with worker
    processes the position would advance in copies of this object."""

    def __init__(
        self,
        items: list[dict[str, Any]],
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"batch_size={global_batch_size} (global, prompts per step) must be a positive multiple of "
                f"world_size={world_size} so every rank gets the same number of prompts"
            )
        if len(items) < global_batch_size:
            raise ValueError(f"{len(items)} prompts are fewer than one batch of batch_size={global_batch_size}")
        self.items = items
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.batches_per_epoch = len(items) // global_batch_size
        self.next_index = 0
        """Index of the next global batch to yield."""
        self.batches_delivered = 0
        """Global batches handed to training (see ``mark_delivered``); what a checkpoint stores."""
        self._epoch_order: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """Item indices in the order epoch ``epoch`` visits them (the same on every rank).

        Safe to call from two threads (the training data loader and an asynchronous rollout
        producer, possibly in different epochs): the cache is read once and replaced whole."""
        cached = self._epoch_order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = list(range(len(self.items)))
        if self.shuffle:
            # A string seed is hashed with SHA-512, so the order is the same in every process.
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        self._epoch_order = (epoch, order)
        return order

    def global_batch_indices(self, index: int) -> list[int]:
        """Item indices of global batch ``index`` (rank ``r``'s share is ``[r::world_size]``)."""
        epoch, batch_in_epoch = divmod(index, self.batches_per_epoch)
        start = batch_in_epoch * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def batch(self, index: int) -> list[dict[str, Any]]:
        """This rank's share of global batch ``index`` (a pure function of the index: an asynchronous
        producer reads batches ahead of training without moving the stream's position)."""
        return [{**self.items[i], STREAM_INDEX_KEY: index} for i in self.global_batch_indices(index)[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        while True:
            index = self.next_index
            batch = self.batch(index)
            # Count the batch when it is yielded; a consumer that reads ahead (Lightning's
            # prefetching) corrects the count with mark_delivered when the batch is really used.
            self.next_index = index + 1
            self.batches_delivered = index + 1
            yield batch

    def mark_delivered(self, batch: list[dict[str, Any]]) -> None:
        """Record that ``batch`` (yielded earlier) is the one training is about to use."""
        self.batches_delivered = batch[0][STREAM_INDEX_KEY] + 1

    def state_dict(self) -> dict[str, int]:
        return {"batches_delivered": self.batches_delivered, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batches_per_epoch"] != self.batches_per_epoch:
            raise ValueError(
                f"checkpoint's data stream has {state['batches_per_epoch']} batches per epoch, this one "
                f"{self.batches_per_epoch}: the train data or batch_size changed, so the position cannot resume"
            )
        self.next_index = self.batches_delivered = state["batches_delivered"]
