"""A finite data set split over data-parallel ranks without counting any item twice.

Lightning's default for evaluation under DDP/FSDP is a ``DistributedSampler``, which pads the
ranks with duplicates of real items (AIME's 30 prompts on 8 ranks become 32, two of them counted
twice in pass@k). :class:`RankShard` gives item ``i`` to rank ``i mod W`` and pads every rank to
the same number of items with *fillers*: copies tagged ``"filler": True``, which are rolled out
like the others (so every rank runs the same number of forward passes, as a sharded model's
collectives require) but must not be counted. It is an ``IterableDataset`` yielding whole batches,
so Lightning does not put a sampler of its own in front of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

__all__ = ["FILLER_KEY", "RankShard"]

FILLER_KEY = "filler"
"""Key set to True on the items that only pad a rank's share; consumers skip them when counting."""


class RankShard(IterableDataset):
    """This rank's batches of ``items``: items ``rank, rank + W, ...``, padded with fillers to
    ``ceil(len(items) / W)``, in batches of ``batch_size`` (the last one may be shorter, on every
    rank alike). Use with ``DataLoader(shard, batch_size=None)``."""

    def __init__(self, items: list[dict[str, Any]], batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not items:
            raise ValueError("RankShard needs at least one item")
        if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        share = -(-len(items) // world_size)
        own = items[rank::world_size]
        filler = {**(own or items)[0], FILLER_KEY: True}
        self.items = own + [filler] * (share - len(own))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, len(self.items), self.batch_size):
            yield self.items[start : start + self.batch_size]
