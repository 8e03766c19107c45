"""One RL step's experience: sampling and scoring its groups (with DAPO/Archer dynamic sampling),
and the typed batch the update trains on (:class:`Experience`).

``collect_groups`` turns this rank's prompt rows into ``n`` scored completions per prompt::

    rows --generate(draw 0)--> groups --score--> rewards --(dynamic sampling)--> keep mask
         [--generate(draw 1, 2, ...) on refill batches while some rank still lacks informative groups]

The result always holds exactly ``len(rows) · n`` samples, so every rank runs the same number of
forward passes over the batch; groups that were dropped stay in the batch with ``keep = False``
(the trainer masks them out of the loss, and its update plan puts them last). Without refill the
groups keep their places; with refill the informative groups fill the slots first. Nothing here touches a model: the
callables do the sampling and scoring, which keeps this reusable by evaluation and by an
asynchronous producer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from archer.algorithms.stats import Ratio
from archer.config import DynamicSamplingConfig
from archer.distributed import Collectives
from archer.rewards.runner import RewardResult
from archer.rollout.base import Completion
from archer.rollout.batch import RolloutBatch

__all__ = ["Experience", "Samples", "ScoredGroups", "collect_groups", "informative_groups"]


@dataclass
class Samples:
    """Flattened rollout samples (group-contiguous: ``n`` consecutive samples share a prompt)."""

    prompts: list[list[int]]
    completions: list[Completion]
    rows: list[dict]
    texts: list[str]

    def __add__(self, other: Samples) -> Samples:
        return Samples(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def select(self, index: list[int]) -> Samples:
        return Samples(*([getattr(self, f.name)[i] for i in index] for f in fields(self)))


@dataclass
class ScoredGroups:
    """What ``collect_groups`` returns: ``N = len(rows) · n`` samples and what their scoring found."""

    samples: Samples
    scores: Tensor
    """``[N]`` float32 rewards (0 for a reward that raised, timed out or returned a non-number)."""
    keep: Tensor
    """``[N]`` bool: the sample's group is informative (or dynamic sampling is off)."""
    rewards: RewardResult
    """Every reward call of the step, refills included (its scores, error and timeout counts)."""
    extra_batches: int = 0
    """Refill batches rolled out (dynamic sampling with ``refill``)."""


@dataclass
class Experience:
    """One RL step's training batch: the rollout and every per-sample quantity the update reads."""

    rollout: RolloutBatch
    """The padded rollout (on the CPU); groups dynamic sampling dropped are masked out of ``response_mask``."""
    response_lengths: Tensor
    """``[N]`` response lengths, dropped groups included."""
    old_logprob: Tensor
    """``[N, R]`` π_old, the trainer's log-probs before the update."""
    ref_logprob: Tensor | None
    """``[N, R]`` the frozen reference's log-probs (None when nothing needs them)."""
    advantages: Tensor
    """``[N, R]`` per-token advantages (after shaping)."""
    pg_weight: Tensor | None
    """``[N, R]`` rollout-correction weights multiplying each token's policy-gradient term (None: off)."""
    mismatch: dict[str, Ratio]
    """Engine-vs-trainer statistics (mismatch_kl, is_weight_mean, ...), empty without engine log-probs."""
    ranks: list[Tensor]
    """Per data-parallel rank, its ``[N, 3]`` rows (prompt length, response length, kept): what the
    micro-batch planner needs to plan every rank's passes identically on all of them."""


def informative_groups(scores: Tensor, n: int) -> Tensor:
    """``[G]`` bool: groups whose rewards are not all equal (all-equal groups have zero advantage)."""
    groups = scores.view(-1, n)
    return (groups.max(-1).values - groups.min(-1).values) > 0


def collect_groups(
    rows: list[dict],
    n: int,
    *,
    generate: Callable[[list[dict], int], Samples],
    score: Callable[[Samples], RewardResult],
    dynamic_sampling: DynamicSamplingConfig | None,
    draw_batch: Callable[[], list[dict]],
    collectives: Collectives,
) -> ScoredGroups:
    """Roll out and score ``rows`` (``generate(rows, draw)`` samples with the draw's seed).

    Dynamic sampling drops groups whose rewards are all equal; with ``refill`` it rolls out further
    batches from ``draw_batch()`` while any rank has fewer informative groups than prompts, up to
    ``max_extra_batches``. The decision to draw again is taken for all ranks at once (a max over
    ranks), because generation can be collective (an FSDP2-sharded actor all-gathers its layers in
    every forward): a rank that stopped alone would leave the others waiting forever.
    """

    results: list[RewardResult] = []

    def scored(batch: list[dict], draw: int) -> tuple[Samples, Tensor]:
        samples = generate(batch, draw)
        results.append(score(samples))
        return samples, torch.tensor(results[-1].scores, dtype=torch.float32)

    samples, scores = scored(rows, 0)
    if dynamic_sampling is None:
        return ScoredGroups(samples, scores, torch.ones_like(scores, dtype=torch.bool), results[0])
    informative = informative_groups(scores, n)
    if not dynamic_sampling.refill:
        return ScoredGroups(samples, scores, informative.repeat_interleave(n), results[0])
    extra_batches = 0
    while extra_batches < dynamic_sampling.max_extra_batches:
        missing = torch.tensor(float(len(rows) - int(informative.sum())))
        if float(collectives.max(missing)) <= 0:
            break
        extra_batches += 1
        extra, extra_scores = scored(draw_batch(), extra_batches)
        samples, scores = samples + extra, torch.cat([scores, extra_scores])
        informative = torch.cat([informative, informative_groups(extra_scores, n)])
    # Keep exactly len(rows) groups: informative ones first, then masked-out fillers.
    groups = torch.argsort((~informative).to(torch.int8), stable=True)[: len(rows)]
    index = (groups[:, None] * n + torch.arange(n)).flatten().tolist()
    keep = informative[groups].repeat_interleave(n)
    return ScoredGroups(samples.select(index), scores[index], keep, sum(results[1:], results[0]), extra_batches)
