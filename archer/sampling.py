"""Sampling and scoring one RL step's groups, with DAPO/Archer dynamic sampling.

:class:`GroupSampler` turns this rank's prompt rows into ``n`` scored completions per prompt: the
rollout engine samples token ids, the tokenizer decodes them, the reward runner scores the texts,
and ``collect_groups`` applies dynamic sampling::

    rows --generate(draw 0)--> groups --score--> rewards --(dynamic sampling)--> keep mask
         [--generate(draw 1, 2, ...) on refill batches while some rank still lacks informative groups]

The result always holds exactly ``len(rows) · n`` samples, so every rank runs the same number of
forward passes over the batch; groups that were dropped stay in the batch with ``keep = False``
(the trainer masks them out of the loss, and its update plan puts them last). Without refill the
groups keep their places; with refill the informative groups fill the slots first. ``collect_groups``
touches no model: its callables do the sampling and scoring, so the synchronous trainer and the
asynchronous producer (:mod:`archer.async_rollout`, with its own reward workers and no collectives)
share it. What comes out, :class:`ScoredGroups`, goes to :class:`archer.experience.ExperienceMaker`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from archer.config import DynamicSamplingConfig
from archer.distributed import Collectives
from archer.rewards.runner import RewardResult, RewardRunner
from archer.rollout.base import Completion, RolloutEngine, SamplingConfig
from archer.seeding import Seeds

__all__ = ["GroupSampler", "Samples", "ScoredGroups", "collect_groups", "informative_groups"]

log = logging.getLogger(__name__)


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


class GroupSampler:
    """Prompt rows in, ``n`` scored completions per prompt out (engine, tokenizer, rewards, dynamic sampling).

    Args:
        engine: The rollout engine (set up by the caller before the first call).
        tokenizer: Decodes the completions for the reward.
        rewards: The reward worker pool that scores them (a pool serves one thread).
        sampling: The training sampling settings (``n`` is the group size).
        dynamic_sampling: Drop (and optionally refill) groups whose rewards are all equal; None keeps all.
        draw_batch: The next prompt batch of the stream (dynamic sampling's refills).
        collectives: Over the ranks (the refill decision is collective); ``Collectives(local=True)``
            off the training thread.
        seeds: The run's seeds; a step's draw ``d`` samples with ``seeds("train", step, d)``.
    """

    def __init__(
        self, engine: RolloutEngine, tokenizer, rewards: RewardRunner, sampling: SamplingConfig, *,
        dynamic_sampling: DynamicSamplingConfig | None, draw_batch: Callable[[], list[dict]],
        collectives: Collectives, seeds: Seeds,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.sampling = sampling
        self.dynamic_sampling = dynamic_sampling
        self.draw_batch = draw_batch
        self.collectives = collectives
        self.seeds = seeds

    def sample(self, rows: list[dict], sampling: SamplingConfig) -> Samples:
        """Roll out ``sampling.n`` completions for each prompt row (flattened, group-contiguous)."""
        prompts = [row["prompt_ids"] for row in rows]
        groups = self.engine.generate(prompts, sampling)
        completions = [c for group in groups for c in group]
        return Samples(
            prompts=[p for p in prompts for _ in range(sampling.n)],
            completions=completions,
            rows=[row["row"] for row in rows for _ in range(sampling.n)],
            texts=self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True),
        )

    def collect(self, rows: list[dict], step: int) -> ScoredGroups:
        """The scored groups of ``rows`` for training step ``step`` (dynamic sampling included), with
        seeds derived per step and draw."""
        scored = collect_groups(
            rows,
            self.sampling.n,
            generate=lambda batch, draw: self.sample(batch, replace(self.sampling, seed=self.seeds("train", step, draw))),
            score=lambda samples: self.rewards.score(samples.texts, samples.rows),
            dynamic_sampling=self.dynamic_sampling,
            draw_batch=self.draw_batch,
            collectives=self.collectives,
        )
        rewards = scored.rewards
        if rewards.num_errors == len(rewards.scores) and rewards.errors and self.seeds.rank == 0:
            # Training on all-zero rewards teaches nothing; say loudly why (a wrong answer_key, a reward bug).
            log.warning("every reward of step %d failed; the first error:\n%s", step, rewards.errors[0])
        return scored
