"""Which rows each optimizer step and each micro-batch of one RL step computes (pure planning).

The rollout batch holds ``G`` groups of ``n`` samples, split over ``W`` ranks by the prompt stream
with a stride: rank ``r``'s local group ``j`` is global group ``j·W + r``. An RL step is
``ppo_epochs`` passes over the batch in mini-batches of ``M`` global groups (one optimizer step
each), and each rank cuts its rows of a mini-batch into micro-batches (one forward/backward each).
The plan is defined on the *global* groups, so it is the same on any number of ranks, and so is
the update:

1. **Order.** Each epoch visits the groups in their global order (or a permutation seeded for the
   step and epoch, the same on every rank, with ``shuffle``), informative groups first: the groups
   dynamic sampling dropped go last and are never computed, as if they had been filtered out of the
   batch before it was split into mini-batches (verl's recipes do that). A mini-batch left with no
   informative group has nothing to learn from; the trainer skips it.
2. **Mini-batches.** Mini-batch ``k`` is the ordered groups ``[k·M, (k+1)·M)``; each rank computes
   the informative ones it holds.
3. **Micro-batches.** :func:`split_rows` cuts a rank's rows either into chunks of
   ``max_sequences`` rows, or — with a token budget — by length, so that each micro-batch's
   computed tokens stay under the budget and each is padded only to its own longest sequence.
4. **Lockstep.** Ranks can hold different numbers of rows (and lengths), but all must run the same
   number of forward passes (an FSDP2 forward all-gathers parameters; a DDP backward all-reduces
   gradients), so every rank pads its list to the largest count with empty micro-batches, which the
   trainer runs on a placeholder row that contributes zero.

Every rank computes the whole plan from the same inputs (the global informative flags and every
rank's row lengths), so planning itself needs no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_group_order", "informative_global_groups", "lockstep", "plan_passes", "plan_update", "split_rows"]


def split_rows(rows: Tensor, lengths: Tensor, *, max_sequences: int, max_tokens: int = 0, packed: bool = False) -> list[Tensor]:
    """Cut ``rows`` (local row indices) into micro-batches.

    Args:
        rows: ``[K]`` long, the rows to cut (in this order when there is no token budget).
        lengths: ``[K, 2]`` long, each row's prompt and response lengths.
        max_sequences: rows per micro-batch without a token budget.
        max_tokens: the token budget; 0 keeps consecutive chunks of ``max_sequences`` rows. Above 0,
            rows are taken longest first and a micro-batch grows while its computed tokens stay within
            the budget: the sum of the rows' lengths when ``packed`` (sequences concatenated, no
            padding), else rows × (longest prompt + longest response) — the padded size. A row
            longer than the budget goes alone.
        packed: how a micro-batch will be computed (see ``max_tokens``).
    """
    if max_tokens <= 0:
        return [rows[i : i + max_sequences] for i in range(0, len(rows), max_sequences)]
    order = torch.argsort(lengths.sum(-1), descending=True, stable=True)
    micro_batches: list[Tensor] = []
    current: list[int] = []
    longest, total = torch.zeros(2, dtype=torch.long), 0  # the current micro-batch's longest prompt/response, Σ lengths
    for i in order.tolist():
        grown, row_total = torch.maximum(longest, lengths[i]), int(lengths[i].sum())
        cost = total + row_total if packed else (len(current) + 1) * int(grown.sum())
        if current and cost > max_tokens:
            micro_batches.append(rows[current])
            current, total, grown = [], 0, lengths[i].clone()
        current.append(i)
        longest, total = grown, total + row_total
    if current:
        micro_batches.append(rows[current])
    return micro_batches


def lockstep(per_rank: list[list[Tensor]], rank: int) -> list[Tensor]:
    """This rank's micro-batches, padded with empty ones to the largest count of any rank (at least one)."""
    count = max(1, *(len(micro) for micro in per_rank))
    own = per_rank[rank]
    return own + [torch.zeros(0, dtype=torch.long)] * (count - len(own))


def plan_passes(ranks: list[Tensor], rank: int, *, max_sequences: int, max_tokens: int = 0,
                packed: bool = False) -> list[Tensor]:
    """This rank's micro-batches over its kept rows, for a no-grad pass, in lockstep with the other
    ranks. ``ranks``: per rank, its ``[N_q, 3]`` rows (prompt length, response length, kept)."""
    kept = [rows[:, 2].nonzero().flatten() for rows in ranks]
    per_rank = [
        split_rows(index, rows[index, :2], max_sequences=max_sequences, max_tokens=max_tokens, packed=packed)
        for index, rows in zip(kept, ranks)
    ]
    return lockstep(per_rank, rank)


def informative_global_groups(ranks: list[Tensor], group_size: int) -> Tensor:
    """``[G]`` bool over the global groups (global group ``j·W + r`` is rank ``r``'s local group ``j``):
    whether dynamic sampling kept it. ``ranks``: per rank, its ``[N_q, 3]`` rows (see :func:`plan_passes`)."""
    return torch.stack([rows[::group_size, 2] > 0 for rows in ranks]).t().reshape(-1)


def global_group_order(informative: Tensor, *, seed: int | None = None) -> Tensor:
    """Global group indices in training order: a seeded permutation (or the identity when ``seed``
    is None), then informative groups first, each part in that order. ``informative`` ``[G]`` bool."""
    order = torch.arange(len(informative))
    if seed is not None:
        order = torch.randperm(len(informative), generator=torch.Generator().manual_seed(seed))
    return order[torch.argsort((~informative[order]).to(torch.int8), stable=True)]


def plan_update(
    informative: Tensor,
    lengths: list[Tensor],
    *,
    rank: int,
    group_size: int,
    groups_per_minibatch: int,
    epoch_seeds: list[int | None],
    max_sequences: int,
    max_tokens: int = 0,
    packed: bool = False,
) -> list[list[Tensor]]:
    """This rank's plan: for each optimizer step, its micro-batches as local row indices.

    Args:
        informative: ``[G]`` bool over the GLOBAL groups (global group ``j·W + r`` is rank ``r``'s
            local group ``j``): False for the groups dynamic sampling dropped.
        lengths: per rank ``q`` (``W = len(lengths)``), its ``[N_q, 2]`` prompt and response lengths.
        rank: this rank.
        group_size: ``n``, sequences per group (local rows ``j·n … j·n + n − 1`` are group ``j``).
        groups_per_minibatch: ``M``, global groups per optimizer step (``G`` for one step per epoch).
        epoch_seeds: one entry per PPO epoch: its shuffle seed, or None for the global order.
        max_sequences, max_tokens, packed: how rows are cut into micro-batches (:func:`split_rows`).

    Returns:
        ``len(epoch_seeds) · ceil(G / M)`` optimizer steps, each a list of long tensors of local row
        indices, the same number on every rank (empty tensors pad; all empty = nothing to learn).
    """
    world_size, num_groups = len(lengths), len(informative)
    if num_groups % world_size or groups_per_minibatch < 1 or max_sequences < 1:
        raise ValueError(
            f"cannot plan {num_groups} groups on {world_size} ranks in mini-batches of {groups_per_minibatch} "
            f"groups and micro-batches of {max_sequences} sequences"
        )
    steps = []
    for seed in epoch_seeds:
        order = global_group_order(informative, seed=seed)
        for start in range(0, num_groups, groups_per_minibatch):
            minibatch = order[start : start + groups_per_minibatch]
            minibatch = minibatch[informative[minibatch]]  # dropped groups are never computed
            per_rank = []
            for q in range(world_size):
                rows = _rows(minibatch[minibatch % world_size == q] // world_size, group_size)
                per_rank.append(split_rows(rows, lengths[q][rows], max_sequences=max_sequences,
                                           max_tokens=max_tokens, packed=packed))
            steps.append(lockstep(per_rank, rank))
    return steps


def _rows(local_groups: Tensor, group_size: int) -> Tensor:
    """Local row indices of the local groups ``local_groups``, group by group."""
    return (local_groups[:, None] * group_size + torch.arange(group_size)).flatten()
