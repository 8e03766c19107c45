"""Configurable policy losses the YAML selects by ``class_path`` (thin wrappers, no formulas here).

Each class stores its hyper-parameters and calls one pure function of
:mod:`archer.algorithms.policy_loss`. The trainer calls every loss the same way, once per
micro-batch::

    context = policy_loss.minibatch_context(response_mask, collectives, entropy=..., logprob=..., advantages=...)  # per mini-batch
    loss, stats = policy_loss(logprob, old_logprob, ref_logprob, advantages, entropy, response_mask,
                              norm_len=..., context=context)

``context`` holds what a micro-batch cannot know alone: the unit counts of the whole mini-batch on
all ranks (so that the micro-batch losses add up to the mini-batch loss exactly, whatever the
micro-batch size or the number of ranks) and, for some losses, quantities such as a batch-level
entropy threshold. When ``needs_minibatch_forward`` is true, the trainer first runs a no-grad
forward over the mini-batch with the current weights and passes its entropies and log-probs (and
the advantages) to ``minibatch_context``, and the same entropies, sliced, to each micro-batch call,
so the token types the context counted are the ones the loss uses. The trainer also reads ``needs_reference`` (whether reference log-probs
must be computed) and ``rho``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from archer.algorithms.aggregation import AggregationMode, agg_units
from archer.algorithms.kl import KLEstimator
from archer.algorithms.policy_loss import clipped_policy_loss, dual_token_loss, high_entropy_mask_loss
from archer.algorithms.stats import Ratio
from archer.algorithms.token_typing import classify_tokens, entropy_threshold
from archer.distributed import Collectives

__all__ = ["PolicyLoss", "ArcherLoss", "GRPOLoss", "DAPOLoss", "HighEntropyMaskLoss"]


class PolicyLoss:
    """Base class: a policy loss ``(logprob, old_logprob, ref_logprob, advantages, entropy, mask) → (loss, stats)``."""

    loss_agg: AggregationMode
    """How per-token losses are reduced (see :mod:`archer.algorithms.aggregation`)."""
    rho: float
    """Entropy quantile that types tokens (for the loss itself or for diagnostics only)."""

    def __init__(self, loss_agg: AggregationMode, rho: float) -> None:
        self.loss_agg = loss_agg
        self.rho = rho

    @property
    def needs_reference(self) -> bool:
        """True iff some KL coefficient is > 0, so reference log-probs must be computed."""
        return False

    @property
    def needs_minibatch_forward(self) -> bool:
        """True iff :meth:`minibatch_context` needs the current policy's entropies and log-probs of the
        whole mini-batch (a no-grad forward over it before its micro-batches)."""
        return False

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, advantages: Tensor | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for every micro-batch call of one mini-batch (module docstring).

        ``response_mask`` ``[N, T]``, and ``entropy``, ``logprob`` (current policy, detached) and
        ``advantages`` ``[N, T]`` when :attr:`needs_minibatch_forward` (else None), cover this rank's
        rows of the mini-batch. The default: ``units``, the count of ``loss_agg`` units over the
        mini-batch on all ranks.
        """
        return {"units": collectives.sum(agg_units(response_mask, self.loss_agg))}

    def __call__(
        self,
        logprob: Tensor,
        old_logprob: Tensor,
        ref_logprob: Tensor | None,
        advantages: Tensor,
        entropy: Tensor,
        response_mask: Tensor,
        *,
        norm_len: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class ArcherLoss(PolicyLoss):
    """Archer's dual-token loss (arXiv 2507.15778) with the paper's defaults.

    How it departs from textbook PPO:

    1. No value function: advantages come from the group (GRPO-style), one per response.
    2. Tokens are typed per response by entropy: the top 1 − ρ = 20% (H_t above the response's
       ρ-quantile, strict) are reasoning tokens, the rest knowledge tokens; typing uses the
       current policy's detached entropy from the training forward pass.
    3. Knowledge tokens: tight clip (0.2, 0.2) and a KL penalty to the reference, β_k = 0.001.
    4. Reasoning tokens: loose clip (0.5, 0.5) and no KL (β_r = 0).
    5. The KL is a loss term (k3 / low_var_kl, gradient through ℓ), not a reward penalty, and each
       type's KL is normalised by that type's own token count.
    6. Dual clip c = 10 for negative advantages.
    7. Aggregation seq-mean-token-mean: what the official code optimises (token mean inside a
       one-response micro-batch, micro-batches averaged), each response weighing the same.
    8. No entropy bonus.
    """

    def __init__(
        self,
        rho: float = 0.8,
        knowledge_clip: tuple[float, float] = (0.2, 0.2),
        reasoning_clip: tuple[float, float] = (0.5, 0.5),
        knowledge_kl: float = 0.001,
        reasoning_kl: float = 0.0,
        dual_clip: float | None = 10.0,
        kl_estimator: KLEstimator = "low_var_kl",
        loss_agg: AggregationMode = "seq-mean-token-mean",
    ) -> None:
        """
        Args:
            rho: entropy quantile ρ; tokens strictly above it (per response) are reasoning tokens.
            knowledge_clip: (ε_low, ε_high) clip band of knowledge (low-entropy) tokens.
            reasoning_clip: (ε_low, ε_high) clip band of reasoning (high-entropy) tokens.
            knowledge_kl: β_k, KL coefficient on knowledge tokens.
            reasoning_kl: β_r, KL coefficient on reasoning tokens.
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
        """
        super().__init__(loss_agg, rho)
        self.knowledge_clip = tuple(knowledge_clip)
        self.reasoning_clip = tuple(reasoning_clip)
        self.knowledge_kl = knowledge_kl
        self.reasoning_kl = reasoning_kl
        self.dual_clip = dual_clip
        self.kl_estimator = kl_estimator

    @property
    def needs_reference(self) -> bool:
        return self.knowledge_kl > 0 or self.reasoning_kl > 0

    @property
    def needs_minibatch_forward(self) -> bool:
        # Each type's KL divides by that type's units over the mini-batch. In the seq-* modes every
        # non-empty response has a knowledge token (its lowest-entropy one), so the knowledge units
        # are the valid ones; knowledge token counts (token-mean) and the count of responses with a
        # reasoning token depend on the entropies.
        return (self.knowledge_kl > 0 and self.loss_agg == "token-mean") or self.reasoning_kl > 0

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, advantages: Tensor | None = None,
    ) -> dict[str, Any]:
        units = collectives.sum(agg_units(response_mask, self.loss_agg))
        if not self.needs_minibatch_forward:
            return {"units": units, "knowledge_units": units}
        reasoning = classify_tokens(entropy, response_mask, self.rho)
        knowledge = response_mask.bool() & ~reasoning
        return {
            "units": units,
            "knowledge_units": collectives.sum(agg_units(knowledge, self.loss_agg)),
            "reasoning_units": collectives.sum(agg_units(reasoning, self.loss_agg)),
        }

    def __call__(
        self,
        logprob: Tensor,
        old_logprob: Tensor,
        ref_logprob: Tensor | None,
        advantages: Tensor,
        entropy: Tensor,
        response_mask: Tensor,
        *,
        norm_len: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        return dual_token_loss(
            logprob, old_logprob, ref_logprob, advantages, entropy, response_mask,
            rho=self.rho, knowledge_clip=self.knowledge_clip, reasoning_clip=self.reasoning_clip,
            knowledge_kl=self.knowledge_kl, reasoning_kl=self.reasoning_kl, dual_clip=self.dual_clip,
            kl_estimator=self.kl_estimator, loss_agg=self.loss_agg, norm_len=norm_len, **(context or {}),
        )


class _ClippedLoss(PolicyLoss):
    """Shared wiring of the single-band losses (GRPO, DAPO) onto :func:`clipped_policy_loss`."""

    def __init__(
        self,
        clip: tuple[float, float],
        dual_clip: float | None,
        kl_coef: float,
        kl_estimator: KLEstimator,
        loss_agg: AggregationMode,
        rho: float,
    ) -> None:
        super().__init__(loss_agg, rho)
        self.clip = tuple(clip)
        self.dual_clip = dual_clip
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def __call__(
        self,
        logprob: Tensor,
        old_logprob: Tensor,
        ref_logprob: Tensor | None,
        advantages: Tensor,
        entropy: Tensor,
        response_mask: Tensor,
        *,
        norm_len: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        return clipped_policy_loss(
            logprob, old_logprob, advantages, response_mask,
            clip=self.clip, dual_clip=self.dual_clip, loss_agg=self.loss_agg, ref_logprob=ref_logprob,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, norm_len=norm_len, entropy=entropy, rho=self.rho,
            **(context or {}),
        )


class GRPOLoss(_ClippedLoss):
    """GRPO (Shao et al. 2024, DeepSeekMath) in Archer's code path.

    How it departs from textbook PPO:

    1. No value function: group-normalised advantages (std-normalised, ε = 1e-6).
    2. One symmetric clip band (0.2, 0.2) for every token.
    3. KL to the reference as a loss term, k3 / low_var_kl, β = 0.001 over all tokens
       (Archer's knowledge-token β, so the two differ only in token typing).
    4. Dual clip c = 10 for negative advantages (not in the GRPO paper; kept to match Archer's
       code path so the comparison isolates the dual-token part; set None to disable).
    5. Aggregation seq-mean-token-mean (GRPO's 1/G Σ_i 1/|o_i| Σ_t).
    """

    def __init__(
        self,
        clip: tuple[float, float] = (0.2, 0.2),
        dual_clip: float | None = 10.0,
        kl_coef: float = 0.001,
        kl_estimator: KLEstimator = "low_var_kl",
        loss_agg: AggregationMode = "seq-mean-token-mean",
        rho: float = 0.8,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) clip band of every token.
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_coef: β, KL coefficient over all valid tokens.
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
        """
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho)


class DAPOLoss(_ClippedLoss):
    """DAPO (Yu et al. 2025, arXiv 2503.14476) loss.

    How it departs from textbook PPO:

    1. No value function: group-normalised advantages.
    2. Clip-higher: asymmetric band (ε_low, ε_high) = (0.2, 0.28).
    3. token-mean aggregation over the whole mini-batch (long responses weigh more).
    4. No KL term (no reference model needed).
    5. Dual clip c = 10 for negative advantages (DAPO's verl recipe).
    (Dynamic sampling and overlong reward shaping live in the rollout / reward code.)
    """

    def __init__(
        self,
        clip: tuple[float, float] = (0.2, 0.28),
        dual_clip: float | None = 10.0,
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = "low_var_kl",
        loss_agg: AggregationMode = "token-mean",
        rho: float = 0.8,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) clip band of every token (clip-higher).
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_coef: β, KL coefficient over all valid tokens (DAPO: 0).
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
        """
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho)


class HighEntropyMaskLoss(PolicyLoss):
    """"80/20" high-entropy minority tokens (Wang et al. 2025, arXiv 2506.01939) on DAPO.

    How it departs from textbook PPO:

    1. No value function: group-normalised advantages.
    2. Policy gradient only through tokens whose entropy is above the ρ = 0.8 quantile (the top
       20%), threshold over the whole mini-batch on all ranks (the paper's batch level;
       ``level="response"`` per response). The entropies are the current policy's, from a no-grad
       forward over the mini-batch before its micro-batches (so micro-batch size and world size do
       not change which tokens are kept; it costs one extra forward per mini-batch).
    3. The PG aggregate runs over those kept tokens only.
    4. DAPO's clip-higher (0.2, 0.28), token-mean, no KL, dual clip c = 10.
    """

    def __init__(
        self,
        rho: float = 0.8,
        level: Literal["response", "batch"] = "batch",
        clip: tuple[float, float] = (0.2, 0.28),
        dual_clip: float | None = 10.0,
        loss_agg: AggregationMode = "token-mean",
    ) -> None:
        """
        Args:
            rho: entropy quantile; only tokens strictly above it get policy gradient.
            level: where the quantile is taken: over each response or over the batch.
            clip: (ε_low, ε_high) clip band.
            dual_clip: dual-clip constant c for negative advantages (None disables).
            loss_agg: aggregation mode of the PG term (over the kept tokens).
        """
        super().__init__(loss_agg, rho)
        self.level = level
        self.clip = tuple(clip)
        self.dual_clip = dual_clip

    @property
    def needs_minibatch_forward(self) -> bool:
        return True  # which tokens are kept (and so the units they count) depends on the entropies

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, advantages: Tensor | None = None,
    ) -> dict[str, Any]:
        mask = response_mask.bool()
        if self.level == "response":
            kept = classify_tokens(entropy, mask, self.rho)
            return {"units": collectives.sum(agg_units(kept, self.loss_agg))}
        pooled = collectives.cat(entropy.detach().double()[mask]).unsqueeze(0)  # every rank's valid tokens
        threshold = entropy_threshold(pooled, torch.ones_like(pooled, dtype=torch.bool), self.rho, level="batch")
        kept = (entropy.detach().double() > threshold) & mask
        return {"threshold": threshold, "units": collectives.sum(agg_units(kept, self.loss_agg))}

    def __call__(
        self,
        logprob: Tensor,
        old_logprob: Tensor,
        ref_logprob: Tensor | None,
        advantages: Tensor,
        entropy: Tensor,
        response_mask: Tensor,
        *,
        norm_len: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        return high_entropy_mask_loss(
            logprob, old_logprob, advantages, entropy, response_mask,
            rho=self.rho, level=self.level, clip=self.clip, dual_clip=self.dual_clip,
            loss_agg=self.loss_agg, norm_len=norm_len, **(context or {}),
        )
