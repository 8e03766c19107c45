"""From scored groups to the update's batch: one RL step's :class:`Experience`.

:class:`ExperienceMaker` takes what sampling produced (:class:`~archer.sampling.ScoredGroups`, from
the training thread or from the asynchronous producer alike) and computes every per-sample quantity
the update reads::

    samples --collate--> padded rollout (groups dynamic sampling dropped: masked out)
      --actor, no grad--> π_old log-probs (or μ, the engine's, with ``off_policy: behaviour``),
                          reference log-probs (when a KL term needs them)
      rewards --overlong shaping, KL in reward--> --advantage estimator--> A_i --shaping--> A_{i,t}
      π_old vs μ --> rollout-correction weights w_t and the mismatch statistics

The formulas are in :mod:`archer.algorithms`; this module only sequences them. The micro-batch plan
of the no-grad passes is defined over every rank's rows (one all-gather of their lengths), so all
ranks run the same number of forward passes.

**On-policy steps skip the π_old pass.** When the update is one optimizer step (one PPO epoch, one
mini-batch) right after a synchronous rollout, π_old equals the update forward's own log-probs,
detached (TRL with ``num_iterations=1`` and verl do the same): the experience leaves ``old_logprob``
to the update, and :meth:`ExperienceMaker.complete` adds what depends on it (the engine–trainer
mismatch statistics) afterwards. Anything that reads π_old *before* the update forces the pass:
:func:`old_logprob_pass_reason` lists the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from archer.algorithms import (
    AdvantageEstimator,
    Ratio,
    compute_advantages,
    kl_in_reward,
    masked_ratio,
    overlong_penalty,
    rollout_correction_weights,
    rollout_mismatch_stats,
)
from archer.config import KLRewardConfig, OverlongConfig, RolloutCorrectionConfig, UpdateConfig
from archer.micro_batches import plan_passes
from archer.rollout.batch import RolloutBatch, collate_rollout
from archer.sampling import ScoredGroups
from archer.shaping import AdvantageShaping

__all__ = ["Experience", "ExperienceMaker", "has_dropout", "old_logprob_pass_reason"]


@dataclass
class Experience:
    """One RL step's training batch: the rollout and every per-sample quantity the update reads."""

    rollout: RolloutBatch
    """The padded rollout (on the CPU); groups dynamic sampling dropped are masked out of ``response_mask``."""
    response_lengths: Tensor
    """``[N]`` response lengths, dropped groups included."""
    old_logprob: Tensor | None
    """``[N, R]`` π_old, the trainer's log-probs before the update; None on an on-policy step until the
    update has computed them (:meth:`ExperienceMaker.complete`)."""
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


class ExperienceMaker:
    """Scored groups → :class:`Experience` (module docstring).

    Args:
        actor: Computes the no-grad log-probs (:meth:`archer.actor.Actor.logprobs`); its collectives,
            rank, packing and micro-batch settings plan the passes.
        pad_token_id: Pads the collated rollout.
        max_new_tokens: The longest response (overlong shaping's horizon).
        advantage: The advantage estimator.
        advantage_shaping: Applied in order after the advantages.
        overlong: DAPO's overlong reward shaping (None: off).
        kl_in_reward: The KL-to-reference reward penalty (None: off).
        rollout_correction: The engine–trainer importance weights' settings.
        engine_matches_trainer: The engine's log-probs are the trainer's own (``HFEngine``), so
            ``rollout_correction.apply: auto`` leaves the weights off.
        behaviour_ratio: The ratio's denominator is the engine's μ itself (asynchronous
            ``off_policy: behaviour``): no π_old pass and no correction weights.
        old_logprob_from_update: The step is on-policy (:func:`old_logprob_pass_reason` returned
            None): leave π_old to the update's own forward.
    """

    def __init__(
        self, actor, *, pad_token_id: int, max_new_tokens: int, advantage: AdvantageEstimator,
        advantage_shaping: list[AdvantageShaping], overlong: OverlongConfig | None,
        kl_in_reward: KLRewardConfig | None, rollout_correction: RolloutCorrectionConfig,
        engine_matches_trainer: bool, behaviour_ratio: bool, old_logprob_from_update: bool = False,
    ) -> None:
        self.actor = actor
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.advantage = advantage
        self.advantage_shaping = advantage_shaping
        self.overlong = overlong
        self.kl_in_reward = kl_in_reward
        self.rollout_correction = rollout_correction
        self.engine_matches_trainer = engine_matches_trainer
        self.behaviour_ratio = behaviour_ratio
        self.old_logprob_from_update = old_logprob_from_update

    def make(self, scored: ScoredGroups) -> Experience:
        """The update's inputs: padded rollout, old and reference log-probs, rewards → advantages, and
        the rollout-correction weights (with the engine–trainer mismatch statistics)."""
        actor = self.actor
        n, device = actor.group_size, actor.device
        rollout = collate_rollout(scored.samples.prompts, scored.samples.completions, self.pad_token_id)
        response_lengths = rollout.response_lengths  # before dropped groups are masked out
        rollout.response_mask = rollout.response_mask * scored.keep[:, None].to(rollout.response_mask.dtype)
        mask = rollout.response_mask.to(device)
        ranks = self._rows_of_every_rank(rollout, scored.keep)
        config: UpdateConfig = actor.config
        passes = plan_passes(ranks, actor.rank, max_sequences=config.micro_batch_size,
                             max_tokens=config.logprob_micro_batch_tokens or config.micro_batch_tokens,
                             packed=actor.packed)
        if self.behaviour_ratio:  # the ratio's denominator is the engine's μ itself: nothing to recompute
            old_logprob = rollout.engine_logprobs.to(device) * mask
        elif self.old_logprob_from_update:  # on-policy: the update's own forward gives it
            old_logprob = None
        else:
            old_logprob = actor.logprobs(rollout, passes)[0]
        ref_logprob = None if actor.reference is None else actor.logprobs(rollout, passes, reference=True)[0]

        rewards = scored.scores.to(device)
        if self.overlong is not None:
            rewards = rewards + overlong_penalty(
                response_lengths.to(device), max_len=self.max_new_tokens, buffer=self.overlong.buffer,
                penalty=self.overlong.penalty,
            )
        if self.kl_in_reward is not None:
            rewards = kl_in_reward(rewards, old_logprob, ref_logprob, mask, beta=self.kl_in_reward.beta,
                                   estimator=self.kl_in_reward.estimator)
        advantages = compute_advantages(rewards, n, estimator=self.advantage, sum_over_ranks=actor.collectives.sum,
                                        valid=scored.keep.to(device))
        advantages = advantages[:, None].expand_as(mask).contiguous()  # [N, R]
        for shaping in self.advantage_shaping:
            advantages = shaping(advantages, old_logprob, mask, n)
        pg_weight, mismatch = (None, {}) if old_logprob is None else self._correction(rollout, old_logprob, mask)
        return Experience(rollout, response_lengths, old_logprob, ref_logprob, advantages, pg_weight, mismatch, ranks)

    def complete(self, exp: Experience, old_logprob: Tensor | None) -> None:
        """After an on-policy update: record π_old (the update forward's, detached) in ``exp`` and the
        mismatch statistics that compare it with the engine's log-probs. A no-op on other steps."""
        if exp.old_logprob is not None or old_logprob is None:
            return
        exp.old_logprob = old_logprob
        weights, exp.mismatch = self._correction(exp.rollout, old_logprob, exp.rollout.response_mask.to(old_logprob.device))
        assert weights is None, "an on-policy step never applies correction weights (old_logprob_pass_reason)"

    def _correction(self, rollout: RolloutBatch, old_logprob: Tensor, mask: Tensor) -> tuple[Tensor | None, dict[str, Ratio]]:
        """The rollout-correction weights (None when not applied) and the mismatch statistics (logged
        whenever the engine reports log-probs)."""
        if rollout.engine_logprobs is None or self.behaviour_ratio:
            return None, {}
        correction = self.rollout_correction
        engine = rollout.engine_logprobs.to(old_logprob.device)
        options = dict(level=correction.level, mode=correction.mode, upper=correction.upper)
        weights = rollout_correction_weights(old_logprob, engine, mask, lower=correction.lower, **options)
        mismatch = rollout_mismatch_stats(old_logprob, engine, mask, weights, **options)
        mismatch["logprob_diff"] = masked_ratio((engine - old_logprob).abs(), mask.bool())
        return (weights if correction.applied(self.engine_matches_trainer) else None), mismatch

    def _rows_of_every_rank(self, rollout: RolloutBatch, keep: Tensor) -> list[Tensor]:
        """Per rank ``q``, its ``[N, 3]`` (prompt length, response length, kept) rows: what the
        micro-batch planner needs to cut every rank's rows the same way on all of them (one all-gather).
        ``keep`` ``[N]``: this rank's rows that dynamic sampling kept."""
        actor = self.actor
        prompt = rollout.attention_mask[:, : rollout.prompt_len].sum(-1)
        response = rollout.response_mask.sum(-1).long()  # 0 for the groups dynamic sampling dropped
        local = torch.stack([prompt, response, keep.long()], -1).to(actor.device)
        return list(actor.collectives.cat(local.flatten()).view(actor.world_size, -1, 3).cpu())


def old_logprob_pass_reason(
    update: UpdateConfig, *, batch_size: int | None, loss, advantage_shaping: list[AdvantageShaping],
    kl_in_reward: bool, asynchronous: bool, correction_applied: bool, dropout: bool = False,
) -> str | None:
    """Why a step needs a separate no-grad π_old pass, or None when π_old can come from the update's
    own forward (module docstring). The pass is needed when the weights change between the rollout
    and a later optimizer step, or when something reads π_old before the update:

    - more than one optimizer step per RL step (``ppo_epochs > 1``, or mini-batches smaller than the
      batch of ``batch_size`` prompts): later steps need π_old of the weights before the first;
    - asynchronous rollouts (the engine's weights lag the trainer's: π_prox is recomputed);
    - ``kl_in_reward`` (the penalty enters the rewards, before the advantages);
    - an advantage shaping that reads log-probs (perplexity shaping);
    - a loss whose mini-batch context reads a pre-pass (``needs_minibatch_forward``: Clip-/KL-Cov,
      the 80/20 batch threshold, Archer's per-type KL units);
    - rollout-correction weights π_old / μ applied to the loss (vLLM engines);
    - dropout in the actor (its modules, ``attention_dropout``, LoRA's ``dropout``): the update's forward
      runs in train mode, so its log-probs would be a noisy π_old (the pass runs in eval mode).
    """
    single = update.mini_batch_size == 0 or (batch_size is not None and update.mini_batch_size >= batch_size)
    reasons = [
        (update.ppo_epochs > 1, f"update.ppo_epochs = {update.ppo_epochs}"),
        (not single, f"update.mini_batch_size = {update.mini_batch_size} < data.batch_size = {batch_size}"),
        (asynchronous, "asynchronous rollouts"),
        (kl_in_reward, "model.kl_in_reward"),
        (any(getattr(s, "uses_logprob", True) for s in advantage_shaping), "an advantage shaping reads log-probs"),
        (loss.needs_minibatch_forward, f"{type(loss).__name__} reads a mini-batch pre-pass"),
        (correction_applied, "rollout-correction weights π_old / μ (model.rollout_correction)"),
        (dropout, "dropout in the actor (the update's forward runs in train mode)"),
    ]
    found = [text for needed, text in reasons if needed]
    return "; ".join(found) if found else None


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether ``model`` drops anything in train mode: a dropout module with p > 0 (LoRA's included),
    or a functional attention dropout (``config.attention_dropout``, HF attention kernels)."""
    modules = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return modules or float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0
