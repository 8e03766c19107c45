"""Every metric one RL step logs, what it means, and how it is reduced over ranks — in one place.

:data:`STEP_METRICS` lists the keys (``docs/metrics.md`` is the same list, checked by a test). Three
reductions:

- **ratios** (:class:`~archer.algorithms.stats.Ratio`): numerators and denominators summed over ranks,
  then divided — the exact global mean, whatever each rank holds; left out when nothing was measured
  (0 / 0: e.g. no reasoning token in the step);
- **totals**: summed over ranks (counts; the phases' tokens/s, which divide each rank's tokens by its
  own time — ranks run in lockstep, so that is the step's throughput);
- **maxima** over ranks (peak memory, the stalest sample), a **minimum** (the oldest weight version);
  and per-step values that are the same on every rank (the learning rate, times, counters).

All ratios and totals go in one all-reduce and one host read.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from archer.actor import UpdateResult
from archer.algorithms import STAT_KEYS, Ratio, masked_ratio
from archer.async_rollout import StalenessReport
from archer.distributed import Collectives
from archer.experience import Experience
from archer.sampling import ScoredGroups
from archer.weight_check import VersionReport, canary_ratio

__all__ = ["STEP_METRICS", "StepTimes", "keys_logged_when", "peak_memory_gb", "reduce_over_ranks", "reset_peak_memory", "step_metrics"]

_LOSS_STATS = {
    "pg_loss": "the policy-gradient loss aggregate (the loss's ``loss_agg``)",
    "kl": "KL to the reference, aggregated like the loss (0 / 0 without a reference)",
    "clipfrac": "fraction of policy-gradient tokens whose surrogate took a clipped branch",
    "clipfrac_reasoning": "the same over reasoning (high-entropy) tokens",
    "clipfrac_knowledge": "the same over knowledge (low-entropy) tokens",
    "kl_reasoning": "KL over reasoning tokens",
    "kl_knowledge": "KL over knowledge tokens",
    "reasoning_fraction": "reasoning tokens / valid tokens",
    "entropy_reasoning": "mean entropy of reasoning tokens",
    "entropy_knowledge": "mean entropy of knowledge tokens",
    "entropy": "mean token entropy of the training forward",
    "ratio_mean": "token mean of the importance ratio π/π_old",
    "approx_kl": "token mean of k3 between π_old and π",
}
assert tuple(_LOSS_STATS) == STAT_KEYS, "every statistic a loss reports is described here"

STEP_METRICS: dict[str, tuple[str, str]] = {
    # key: (when it is logged, what it is)
    "train/reward_mean": ("always", "mean reward of the step's samples (dropped groups included)"),
    "train/solve_rate": ("always", "fraction of prompts with at least one reward >= 1"),
    "train/response_length_mean": ("always", "mean response length in tokens"),
    "train/response_clip_ratio": ("always", "fraction of responses cut at max_new_tokens"),
    "train/advantage_abs_mean": ("always", "token mean of |A| over the kept tokens"),
    "train/kept_groups_fraction": ("always", "fraction of samples whose group dynamic sampling kept"),
    **{f"train/{key}": ("always", text) for key, text in _LOSS_STATS.items()},
    "train/grad_norm": ("always", "gradient norm before clipping, mean over the optimizer steps taken"),
    "train/lr": ("always", "learning rate of the step"),
    "train/optimizer_steps": ("always", "optimizer steps that moved the weights"),
    "train/nonfinite_steps": ("always", "optimizer steps skipped for a non-finite loss or gradient norm, since the start"),
    "train/empty_steps": ("always", "optimizer steps skipped for a mini-batch without tokens, since the start"),
    "reward/error_fraction": ("always", "share of reward calls that raised or returned a non-number (timeouts: reward/timeouts)"),
    "reward/errors": ("always", "reward calls that raised or returned a non-number"),
    "reward/timeouts": ("always", "reward calls that exceeded reward_timeout_s"),
    "time/rollout_s": ("always", "seconds sampling and scoring (asynchronous: waiting for the producer)"),
    "time/logprob_s": ("always", "seconds in the no-grad old / reference log-prob passes"),
    "time/update_s": ("always", "seconds in the optimizer steps"),
    "perf/rollout_tokens_per_s": ("synchronous", "response tokens sampled per second"),
    "perf/logprob_tokens_per_s": ("always", "real tokens per second of the no-grad passes"),
    "perf/update_tokens_per_s": ("always", "real tokens per second of the update's passes"),
    "perf/tokens_per_s": ("always", "prompt + response tokens of the step per second of the whole step"),
    "perf/pad_fraction": ("always", "share of the update's computed token positions that were padding"),
    "perf/forward_passes_actor": ("always", "forward passes of the policy model in the step (no-grad and update; rollouts excluded)"),
    "perf/forward_passes_reference": ("always", "forward passes of the reference model in the step"),
    "perf/peak_memory_gb": ("always", "peak memory of the step (GPU), or the process's peak RSS (CPU); max over ranks"),
    "rollout/batch_index": ("always", "index of the prompt batch in the stream"),
    "rollout/extra_batches": ("dynamic sampling", "refill batches rolled out"),
    "rollout/mismatch_kl": ("engine log-probs", "KL between the engine's μ and the trainer's π_old"),
    "rollout/is_weight_mean": ("engine log-probs", "mean rollout-correction weight"),
    "rollout/is_affected_fraction": ("engine log-probs", "share of tokens (or responses) truncated or masked"),
    "rollout/logprob_diff": ("engine log-probs", "token mean of |μ − π_old|"),
    "rollout/canary_gap": ("engine log-probs", "token mean of |μ − π_old| over the samples of the trainer's current "
                           "weights (asynchronous: staleness 0), checked by model.weight_check"),
    "rollout/weight_version": ("weight versions", "the oldest weight version that sampled a sample of the step"),
    "rollout/stale_dropped": ("weight versions", "samples dropped for their weight version (asynchronous: beyond "
                              "max_staleness; synchronous: not the last sync's, with weight_check.on_stale: drop)"),
    "rollout/staleness_mean": ("asynchronous", "mean staleness of the samples, in steps"),
    "rollout/staleness_max": ("asynchronous", "largest staleness of a sample"),
    "time/trainer_idle_s": ("asynchronous", "seconds the trainer waited for its batch"),
    "time/producer_idle_s": ("asynchronous", "seconds the producer waited for the staleness bound"),
    "time/weight_sync_s": ("WeightSyncCallback", "seconds pushing the weights to the engine"),
}
"""Every key a training step logs: ``(when, meaning)``. ``docs/metrics.md`` lists the same keys."""


def keys_logged_when(*conditions: str) -> set[str]:
    """The keys of :data:`STEP_METRICS` a run logs under these conditions (``always`` included), e.g.
    ``keys_logged_when("synchronous", "engine log-probs")``."""
    return {key for key, (when, _) in STEP_METRICS.items() if when in {"always", *conditions}}


@dataclass
class StepTimes:
    """Seconds in each phase of one RL step, and the tokens the no-grad passes computed."""

    rollout: float
    logprob: float
    update: float
    total: float
    logprob_tokens: float


def step_metrics(
    scored: ScoredGroups, exp: Experience, update: UpdateResult, times: StepTimes, *, group_size: int, lr: float,
    counters: dict[str, int], batch_index: int, dynamic_sampling: bool, stale: StalenessReport | None,
    forward_passes: Mapping[str, int], collectives: Collectives, device: torch.device,
    versions: VersionReport | None = None,
) -> dict[str, float]:
    """The step's values of :data:`STEP_METRICS` (those its settings produce), the same on every rank."""
    n, scores, keep = group_size, scored.scores, scored.keep
    mask = exp.rollout.response_mask.to(device).bool()
    tokens = update.computed_tokens
    ratios = {
        "train/reward_mean": Ratio.of(scores.sum(), len(scores)),
        "train/solve_rate": Ratio.of((scores.view(-1, n) >= 1.0).any(-1).sum(), len(scores) // n),
        "train/response_length_mean": Ratio.of(exp.response_lengths.sum(), len(scores)),
        "train/response_clip_ratio": Ratio.of(exp.rollout.truncated.sum(), len(scores)),
        "train/advantage_abs_mean": masked_ratio(exp.advantages.abs(), mask),
        "train/kept_groups_fraction": Ratio.of(keep.sum(), len(scores)),
        "reward/error_fraction": Ratio.of(scored.rewards.num_errors, len(scored.rewards.scores)),
        "perf/pad_fraction": Ratio(tokens.den - tokens.num, tokens.den),
        **{f"train/{key}": value for key, value in update.stats.items()},
        **{f"rollout/{key}": value for key, value in exp.mismatch.items()},
    }
    totals = {
        "reward/errors": scored.rewards.num_errors,
        "reward/timeouts": scored.rewards.num_timeouts,
        "perf/logprob_tokens_per_s": times.logprob_tokens / times.logprob,
        "perf/update_tokens_per_s": float(tokens.num) / times.update,
        "perf/tokens": float(exp.rollout.attention_mask.sum()),  # prompt + response tokens of the step
    }
    if stale is None:  # asynchronous, the rollout time is the trainer's wait, not generation
        totals["perf/rollout_tokens_per_s"] = float(exp.response_lengths.sum()) / times.rollout
    else:
        ratios["rollout/staleness_mean"] = Ratio.of(stale.lag.sum(), len(stale.lag))
    if exp.mismatch:  # the engine's log-probs were compared with π_old: the canary, on the current weights' samples
        fresh = torch.ones(len(scores), dtype=torch.bool) if stale is None else stale.lag == 0
        canary = canary_ratio(exp.rollout.engine_logprobs, exp.old_logprob, exp.rollout.response_mask, fresh)
        if canary is not None:
            ratios["rollout/canary_gap"] = canary
    if versions is not None:
        totals["rollout/stale_dropped"] = versions.dropped
    if dynamic_sampling:
        totals["rollout/extra_batches"] = scored.extra_batches
    metrics = reduce_over_ranks(ratios, totals, collectives, device)
    if stale is not None:
        metrics["rollout/staleness_max"] = float(collectives.max(torch.tensor(float(stale.lag.max()))))
    if versions is not None:  # the same condition on every rank (the engine's kind)
        oldest = float(collectives.min(torch.tensor(math.inf if versions.oldest is None else float(versions.oldest))))
        if math.isfinite(oldest):
            metrics["rollout/weight_version"] = oldest
    metrics.update({
        "train/lr": lr,
        "train/optimizer_steps": float(update.steps_taken),
        "train/nonfinite_steps": float(counters["nonfinite_steps"]),
        "train/empty_steps": float(counters["empty_steps"]),
        "time/rollout_s": times.rollout,
        "time/logprob_s": times.logprob,
        "time/update_s": times.update,
        "perf/tokens_per_s": metrics.pop("perf/tokens") / times.total,
        "rollout/batch_index": float(batch_index),
        # The same on every rank: ranks run their passes in lockstep.
        "perf/forward_passes_actor": float(forward_passes.get("actor", 0)),
        "perf/forward_passes_reference": float(forward_passes.get("reference", 0)),
    })
    if stale is not None:
        metrics.update({"time/trainer_idle_s": stale.trainer_idle_s, "time/producer_idle_s": stale.producer_idle_s})
    metrics["perf/peak_memory_gb"] = float(collectives.max(torch.tensor(peak_memory_gb(device))))
    return metrics


def reduce_over_ranks(ratios: dict[str, Ratio], totals: dict[str, float], collectives: Collectives,
                      device: torch.device) -> dict[str, float]:
    """Ratios (numerators and denominators summed over ranks, then divided) and totals (summed over
    ranks), in one all-reduce and one host read. Ratios with nothing measured are left out."""
    # Every rank must reduce the same keys in the same order: sorted, and losses report a fixed key set.
    ratios, totals = dict(sorted(ratios.items())), dict(sorted(totals.items()))
    parts = [torch.stack([r.num.to(device), r.den.to(device)]) for r in ratios.values()]
    parts.append(torch.tensor(list(totals.values()), dtype=torch.float64, device=device).view(-1, 1).expand(-1, 2))
    reduced = collectives.sum(torch.cat([p.reshape(-1, 2) for p in parts])).tolist()
    values = {key: num / den for key, (num, den) in zip(ratios, reduced) if den > 0}
    values.update({key: num for key, (num, _) in zip(totals, reduced[len(ratios):])})
    return values


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: GPU memory allocated since the step began, or (CPU) the process's peak
    resident set since it started (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
