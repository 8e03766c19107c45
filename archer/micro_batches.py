"""Which rows each optimizer step and each micro-batch of one RL step trains on (pure planning).

The rollout batch holds ``G`` groups of ``n`` samples, split over ``W`` ranks by the prompt stream
with a stride: rank ``r``'s local group ``j`` is global group ``j·W + r``. An RL step is
``ppo_epochs`` passes over the batch in mini-batches of ``M`` global groups (one optimizer step
each), and a mini-batch is cut into micro-batches of at most ``micro_batch_size`` sequences (one
forward/backward each). The plan is defined on the *global* groups, so it is the same on any number
of ranks, and so is the update:

1. Order the groups: each epoch visits them in their global order (or a permutation seeded for
   the step and epoch, the same on every rank, with ``shuffle``), informative groups first —
   dropped groups (dynamic sampling) go last, as if they had been filtered out of the batch before
   it was split into mini-batches, as verl's recipes do. So mini-batches stay full of groups to
   learn from, and the ones left with no informative group are skipped by the trainer.
2. Mini-batch ``k`` is the ordered groups ``[k·M, (k+1)·M)``; each rank trains on the ones it holds.
3. Each rank cuts its rows of the mini-batch into micro-batches. Ranks can hold different numbers
   of rows of a mini-batch, but all must run the same number of forward/backward passes (an
   FSDP2 forward all-gathers parameters; a DDP backward all-reduces gradients), so every rank
   pads its list to the largest count with empty micro-batches, which the trainer runs on a fully
   masked row (a forward/backward that contributes zero).

Every rank computes the whole plan from the same inputs (the global informative flags), so
planning needs no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["plan_update", "global_group_order"]


def global_group_order(informative: Tensor, *, seed: int | None = None) -> Tensor:
    """Global group indices in training order: a seeded permutation (or the identity when ``seed``
    is None), then informative groups first, each part in that order. ``informative`` ``[G]`` bool."""
    order = torch.arange(len(informative))
    if seed is not None:
        order = torch.randperm(len(informative), generator=torch.Generator().manual_seed(seed))
    return order[torch.argsort((~informative[order]).to(torch.int8), stable=True)]


def plan_update(
    informative: Tensor,
    *,
    rank: int,
    world_size: int,
    group_size: int,
    groups_per_minibatch: int,
    micro_batch_size: int,
    epoch_seeds: list[int | None],
) -> list[list[Tensor]]:
    """This rank's plan: for each optimizer step, its micro-batches as local row indices.

    Args:
        informative: ``[G]`` bool over the GLOBAL groups (global group ``j·W + r`` is rank ``r``'s
            local group ``j``): False for groups dynamic sampling dropped.
        rank, world_size: this rank and the number of data-parallel ranks (``G % W == 0``).
        group_size: ``n``, sequences per group (local rows ``j·n … j·n + n − 1`` are group ``j``).
        groups_per_minibatch: ``M``, global groups per optimizer step (``G`` for one step per epoch).
        micro_batch_size: sequences per forward/backward on one rank.
        epoch_seeds: one entry per PPO epoch: the shuffle seed of that epoch, or None for the
            global order.

    Returns:
        ``len(epoch_seeds) · ceil(G / M)`` optimizer steps, each a list of long tensors of local row
        indices; every rank gets the same number of micro-batches per step, padded with empty tensors.
    """
    num_groups = len(informative)
    if num_groups % world_size or groups_per_minibatch < 1 or micro_batch_size < 1:
        raise ValueError(
            f"cannot plan {num_groups} groups on {world_size} ranks in mini-batches of {groups_per_minibatch} "
            f"groups and micro-batches of {micro_batch_size} sequences"
        )
    steps = []
    for seed in epoch_seeds:
        order = global_group_order(informative, seed=seed)
        for start in range(0, num_groups, groups_per_minibatch):
            minibatch = order[start : start + groups_per_minibatch]
            rows_per_rank = [
                _rows(minibatch[minibatch % world_size == r] // world_size, group_size) for r in range(world_size)
            ]
            count = max(1, *(-(-len(rows) // micro_batch_size) for rows in rows_per_rank))
            own = rows_per_rank[rank]
            micro = [own[i : i + micro_batch_size] for i in range(0, len(own), micro_batch_size)]
            steps.append(micro + [torch.zeros(0, dtype=torch.long)] * (count - len(micro)))
    return steps


def _rows(local_groups: Tensor, group_size: int) -> Tensor:
    """Local row indices of the local groups ``local_groups``, group by group."""
    return (local_groups[:, None] * group_size + torch.arange(group_size)).flatten()
