"""Configurable policy losses the YAML selects by ``class_path`` (thin wrappers, no formulas here).

Each class stores its hyper-parameters and calls one pure function of :mod:`archer.algorithms`
(:mod:`~archer.algorithms.policy_loss`, :mod:`~archer.algorithms.gspo`,
:mod:`~archer.algorithms.cispo`). The trainer calls every loss the same way::

    context = loss.minibatch_context(response_mask, collectives, entropy=..., logprob=..., old_logprob=...,
                                     advantages=..., seed=...)                     # once per mini-batch
    for rows in micro_batches:                                                     # positions in the mini-batch
        loss_value, stats = loss(logprob, old_logprob, ref_logprob, advantages, entropy, response_mask,
                                 norm_len=..., pg_weight=..., context=loss.micro_batch_context(context, rows))

``context`` holds what a micro-batch cannot know alone: the unit counts of the whole mini-batch on
all ranks (so that the micro-batch losses add up to the mini-batch loss exactly, whatever the
micro-batch size or the number of ranks) and, for some losses, quantities such as a batch-level
entropy threshold or the tokens Clip-Cov / KL-Cov act on (a ``[N, T]`` tensor over this rank's
rows of the mini-batch, which :meth:`~PolicyLoss.micro_batch_context` slices to the micro-batch's
``rows``; a micro-batch trimmed to fewer columns is fine). When ``needs_minibatch_forward`` is
true, the trainer first runs a no-grad forward over the mini-batch with the current weights and
passes its entropies and log-probs (with the old log-probs, the advantages and a seed) to
``minibatch_context``, and the same entropies, sliced, to each micro-batch call, so the token
types the context counted are the ones the loss uses.

The trainer also reads ``needs_reference`` (whether reference log-probs must be computed),
``needs_entropy_grad`` (``entropy_coef`` ≠ 0: the entropy passed to the loss must carry its
gradient, ``token_logprobs_and_entropy(..., entropy_grad=True)``; when the loss also needs the
pre-pass entropies, pass ``prepass + (entropy − entropy.detach())``: the pre-pass values, the
micro-batch's gradient) and ``rho``. ``pg_weight``
(``[B, T]``, detached; e.g. :func:`~archer.algorithms.rollout_correction.rollout_correction_weights`)
multiplies each token's policy-gradient term.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from archer.algorithms.aggregation import AggregationMode, agg_units
from archer.algorithms.cispo import cispo_loss
from archer.algorithms.covariance import ClipCov, KLCov
from archer.algorithms.gspo import gspo_loss
from archer.algorithms.kl import KLEstimator
from archer.algorithms.policy_loss import clipped_cov_tokens, clipped_policy_loss, dual_token_loss, high_entropy_mask_loss
from archer.algorithms.stats import Ratio
from archer.algorithms.token_typing import classify_tokens, entropy_threshold
from archer.distributed import Collectives

__all__ = [
    "PolicyLoss", "ArcherLoss", "GRPOLoss", "DAPOLoss", "HighEntropyMaskLoss", "GSPOLoss", "CISPOLoss", "ClipCovLoss",
    "KLCovLoss",
]


class PolicyLoss:
    """Base class: a policy loss ``(logprob, old_logprob, ref_logprob, advantages, entropy, mask) → (loss, stats)``.

    Subclasses implement :meth:`_compute` (the pure function with their settings) and, when a
    micro-batch needs more than the mini-batch's units, :meth:`minibatch_context`.
    """

    loss_agg: AggregationMode
    """How per-token losses are reduced (see :mod:`archer.algorithms.aggregation`)."""
    rho: float
    """Entropy quantile that types tokens (for the loss itself or for diagnostics only)."""
    entropy_coef: float
    """Coefficient of the entropy bonus −coef·agg(H_t) (0: none)."""
    row_aligned_context: tuple[str, ...] = ()
    """Context entries with one row per row of the mini-batch (sliced by :meth:`micro_batch_context`)."""

    def __init__(self, loss_agg: AggregationMode, rho: float, entropy_coef: float = 0.0) -> None:
        self.loss_agg = loss_agg
        self.rho = rho
        self.entropy_coef = entropy_coef

    @property
    def needs_reference(self) -> bool:
        """True iff some KL coefficient is > 0, so reference log-probs must be computed."""
        return False

    @property
    def needs_minibatch_forward(self) -> bool:
        """True iff :meth:`minibatch_context` needs the current policy's entropies and log-probs of the
        whole mini-batch (a no-grad forward over it before its micro-batches)."""
        return False

    @property
    def needs_entropy_grad(self) -> bool:
        """True iff the loss has an entropy bonus, so the entropy it is given must carry its gradient."""
        return self.entropy_coef != 0

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, old_logprob: Tensor | None = None, advantages: Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for every micro-batch call of one mini-batch (module docstring).

        ``response_mask`` ``[N, T]``, and ``entropy``, ``logprob`` (current policy, detached),
        ``old_logprob`` and ``advantages`` ``[N, T]`` when :attr:`needs_minibatch_forward` (else
        None), cover this rank's rows of the mini-batch. ``seed`` seeds the random choices a loss
        makes over the mini-batch (Clip-Cov); it must differ between ranks, mini-batches and epochs.
        The default: ``units``, the count of ``loss_agg`` units over the mini-batch on all ranks.
        """
        return {"units": collectives.sum(agg_units(response_mask, self.loss_agg))}

    def micro_batch_context(self, context: dict[str, Any], rows: slice | Tensor) -> dict[str, Any]:
        """The context of the micro-batch made of ``rows`` (positions in this rank's mini-batch rows)."""
        return {key: value[rows] if key in self.row_aligned_context else value for key, value in context.items()}

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
        pg_weight: Tensor | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        """``(loss, stats)`` of one micro-batch; ``pg_weight`` ``[B, T]`` multiplies each token's PG term."""
        return self._compute(
            logprob, old_logprob, ref_logprob, advantages, entropy, response_mask,
            norm_len=norm_len, pg_weight=pg_weight, entropy_coef=self.entropy_coef, **(context or {}),
        )

    def _compute(
        self, logprob: Tensor, old_logprob: Tensor, ref_logprob: Tensor | None, advantages: Tensor, entropy: Tensor,
        response_mask: Tensor, **options: Any,
    ) -> tuple[Tensor, dict[str, Ratio]]:
        """The pure function with this loss's settings; ``options``: norm_len, pg_weight, entropy_coef, the context."""
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
        entropy_coef: float = 0.0,
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
            entropy_coef: entropy bonus coefficient (the paper: 0).
        """
        super().__init__(loss_agg, rho, entropy_coef)
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
        logprob: Tensor | None = None, old_logprob: Tensor | None = None, advantages: Tensor | None = None,
        seed: int | None = None,
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

    def _compute(self, logprob, old_logprob, ref_logprob, advantages, entropy, response_mask, **options):
        return dual_token_loss(
            logprob, old_logprob, ref_logprob, advantages, entropy, response_mask,
            rho=self.rho, knowledge_clip=self.knowledge_clip, reasoning_clip=self.reasoning_clip,
            knowledge_kl=self.knowledge_kl, reasoning_kl=self.reasoning_kl, dual_clip=self.dual_clip,
            kl_estimator=self.kl_estimator, loss_agg=self.loss_agg, **options,
        )


class _WithKL(PolicyLoss):
    """A loss with one uniform KL-to-reference term ``kl_coef · agg(KL_t)``."""

    def __init__(
        self, kl_coef: float, kl_estimator: KLEstimator, loss_agg: AggregationMode, rho: float, entropy_coef: float
    ) -> None:
        super().__init__(loss_agg, rho, entropy_coef)
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0


class _ClippedLoss(_WithKL):
    """Shared wiring of the single-band losses (GRPO, DAPO, Clip-Cov, KL-Cov) onto :func:`clipped_policy_loss`.

    With ``cov`` (Clip-Cov / KL-Cov), the covariance, its means and the chosen tokens are those of
    the whole mini-batch on all ranks: :meth:`minibatch_context` selects them from the no-grad
    forward's log-probs (and the old log-probs, for Clip-Cov's exclusion of already clipped tokens),
    the per-token keys (Clip-Cov's random choice, KL-Cov's tie-break) drawn from a generator seeded
    with ``seed`` on the mask's device (None: torch's global generator, not reproducible); each
    micro-batch receives its rows of the selection.
    """

    row_aligned_context = ("cov_tokens",)

    def __init__(
        self,
        clip: tuple[float, float] | None,
        dual_clip: float | None,
        kl_coef: float,
        kl_estimator: KLEstimator,
        loss_agg: AggregationMode,
        rho: float,
        entropy_coef: float,
        cov: ClipCov | KLCov | None = None,
    ) -> None:
        super().__init__(kl_coef, kl_estimator, loss_agg, rho, entropy_coef)
        self.clip = None if clip is None else tuple(clip)
        self.dual_clip = dual_clip
        self.cov = cov

    @property
    def needs_minibatch_forward(self) -> bool:
        return self.cov is not None  # the covariance needs the current log-probs of the whole mini-batch

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, old_logprob: Tensor | None = None, advantages: Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        context = super().minibatch_context(response_mask, collectives)
        if self.cov is None:
            return context
        if logprob is None or old_logprob is None or advantages is None:
            raise ValueError(f"{type(self).__name__}.minibatch_context needs logprob, old_logprob and advantages")
        generator = None if seed is None else torch.Generator(device=response_mask.device).manual_seed(seed)
        context["cov_tokens"] = clipped_cov_tokens(
            self.cov, logprob, old_logprob, advantages, response_mask, clip=self.clip, dual_clip=self.dual_clip,
            generator=generator, gather=collectives.cat,
        )
        return context

    def _compute(self, logprob, old_logprob, ref_logprob, advantages, entropy, response_mask, *, cov_tokens=None,
                 **options):
        if cov_tokens is not None:  # a micro-batch trimmed to its own longest response has fewer columns
            cov_tokens = _fit_columns(cov_tokens, response_mask.shape[-1])
        return clipped_policy_loss(
            logprob, old_logprob, advantages, response_mask,
            clip=self.clip, dual_clip=self.dual_clip, loss_agg=self.loss_agg, ref_logprob=ref_logprob,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy=entropy, rho=self.rho, cov=self.cov,
            cov_tokens=cov_tokens, **options,
        )


def _fit_columns(tokens: Tensor, width: int) -> Tensor:
    """Bool ``[n, T']`` → ``[n, width]``: drop or add columns at the right (padding in the micro-batch)."""
    fitted = torch.zeros(tokens.shape[0], width, dtype=torch.bool, device=tokens.device)
    shared = min(width, tokens.shape[-1])
    fitted[:, :shared] = tokens[:, :shared]
    return fitted


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
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) clip band of every token.
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_coef: β, KL coefficient over all valid tokens.
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (0: none).
        """
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho, entropy_coef)


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
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) clip band of every token (clip-higher).
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_coef: β, KL coefficient over all valid tokens (DAPO: 0).
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (DAPO: 0).
        """
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho, entropy_coef)


class ClipCovLoss(_ClippedLoss):
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617): drop the gradient of a few high-covariance tokens.

    How it departs from textbook PPO (defaults: the paper's code, PRIME-RL/Entropy-Mechanism-of-RL
    ``compute_policy_loss_clip_cov`` as in verl's ``core_algos.py``, and its ``7b_clip_cov.sh`` recipe):

    1. No value function: group-normalised advantages.
    2. A wide ratio clip (ε_low, ε_high) = (1, 1), i.e. the band [0, 2] (the recipe's
       ``clip_ratio_low = clip_ratio_high = 1``): Clip-Cov, not the ratio clip, keeps the update small.
    3. Per token c_t = (ℓ_t − mean ℓ)(A_t − mean A) over the mini-batch's valid tokens; among the
       tokens with 1 ≤ c_t ≤ 5 (ω_low, ω_high) not already clipped, a random r = 2·10⁻⁴ of all
       valid tokens (at least one) lose their policy-gradient term.
    4. The covariance, its means and the random choice are over the whole mini-batch on all ranks
       (a no-grad forward before the micro-batches; the choice is seeded by the trainer per rank,
       mini-batch and epoch, so a resumed run repeats it).
    5. token-mean, no KL term, no dual clip (verl's Clip-Cov loss has none), no entropy bonus.
    """

    def __init__(
        self,
        clip: tuple[float, float] | None = (1.0, 1.0),
        dual_clip: float | None = None,
        clip_cov_ratio: float = 2e-4,
        clip_cov_bounds: tuple[float, float] = (1.0, 5.0),
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = "low_var_kl",
        loss_agg: AggregationMode = "token-mean",
        rho: float = 0.8,
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) ratio clip band (None: no ratio clip).
            dual_clip: dual-clip constant c for negative advantages (None disables).
            clip_cov_ratio: r, the fraction of valid tokens whose PG term is dropped.
            clip_cov_bounds: (ω_low, ω_high), the covariance band of the candidates.
            kl_coef: β, KL-to-reference coefficient over all valid tokens.
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (0: none).
        """
        cov = ClipCov(ratio=clip_cov_ratio, low=clip_cov_bounds[0], high=clip_cov_bounds[1])
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho, entropy_coef, cov)


class KLCovLoss(_ClippedLoss):
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617): penalise the drift of the highest-covariance tokens.

    How it departs from textbook PPO (defaults: the paper's code, PRIME-RL/Entropy-Mechanism-of-RL
    ``compute_policy_loss_kl_cov`` as in verl's ``core_algos.py``, and its ``7b_kl_cov.sh`` recipe):

    1. No value function: group-normalised advantages.
    2. No ratio clip: pg_t = −A_t r_t (the paper's KL-Cov loss has none; ``clip`` restores one).
    3. Per token c_t = (ℓ_t − mean ℓ)(A_t − mean A) over the mini-batch's valid tokens; the top
       κ = 2·10⁻³ of them by c_t (at least one) get pg_t += β·|ℓ_t − ℓ^old_t|, β = 1 (verl's generic
       config defaults to κ = 2·10⁻⁴, β = 0.1; the 7B recipe uses these).
    4. The covariance and the top-κ threshold are over the whole mini-batch on all ranks (a no-grad
       forward before the micro-batches); exact ties in c_t are broken by seeded random keys.
    5. token-mean, no KL-to-reference term, no dual clip, no entropy bonus.
    """

    def __init__(
        self,
        clip: tuple[float, float] | None = None,
        dual_clip: float | None = None,
        kl_cov_ratio: float = 2e-3,
        kl_cov_coef: float = 1.0,
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = "low_var_kl",
        loss_agg: AggregationMode = "token-mean",
        rho: float = 0.8,
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) ratio clip band (None: no ratio clip, the paper's choice).
            dual_clip: dual-clip constant c for negative advantages (None disables).
            kl_cov_ratio: κ, the fraction of valid tokens (largest covariance) that get the penalty.
            kl_cov_coef: β, coefficient of the |ℓ − ℓ_old| penalty.
            kl_coef: KL-to-reference coefficient over all valid tokens.
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            loss_agg: aggregation mode of the PG and KL terms.
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (0: none).
        """
        cov = KLCov(ratio=kl_cov_ratio, coef=kl_cov_coef)
        super().__init__(clip, dual_clip, kl_coef, kl_estimator, loss_agg, rho, entropy_coef, cov)


class GSPOLoss(_WithKL):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), GSPO-token form.

    How it departs from textbook PPO:

    1. No value function: group-normalised advantages.
    2. One importance ratio per response, s_i = exp(mean_t(ℓ_t − ℓ^old_t)) (the geometric mean of
       its token ratios), clipped per response; GSPO-token form s_{i,t} = sg(s_i)·exp(ℓ_t − sg(ℓ_t)),
       so per-token advantages are allowed and with one advantage per response it is exactly the
       sequence-level objective.
    3. A tiny clip band (ε_low, ε_high) = (3·10⁻⁴, 4·10⁻⁴) (the paper's), since s_i moves far less
       than a token ratio.
    4. Aggregation seq-mean-token-mean (fixed: the objective is a mean over responses).
    5. No dual clip, no KL term (the paper's default; ``kl_coef`` adds one), no entropy bonus.
    """

    def __init__(
        self,
        clip: tuple[float, float] = (3e-4, 4e-4),
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = "low_var_kl",
        rho: float = 0.8,
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) clip band of the sequence ratio.
            kl_coef: β, KL-to-reference coefficient (seq-mean-token-mean over all valid tokens).
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (0: none).
        """
        super().__init__(kl_coef, kl_estimator, "seq-mean-token-mean", rho, entropy_coef)
        self.clip = tuple(clip)

    def _compute(self, logprob, old_logprob, ref_logprob, advantages, entropy, response_mask, *, norm_len=None,
                 **options):  # norm_len is for seq-mean-token-sum-norm, which GSPO does not use
        return gspo_loss(
            logprob, old_logprob, advantages, response_mask, clip=self.clip, ref_logprob=ref_logprob,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy=entropy, rho=self.rho, **options,
        )


class CISPOLoss(_WithKL):
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, keep every token's gradient.

    How it departs from textbook PPO:

    1. No value function: group-normalised advantages.
    2. The PPO min/clip is gone: each token's loss is −r̂_t A_t ℓ_t with the detached weight
       r̂_t = sg(clip(r_t, 1 − ε_low, 1 + ε_high)), so every token keeps a gradient r̂ A ∇ℓ.
    3. (ε_low, ε_high) = (1.0, 4.0), i.e. r̂ ∈ [0, 5]: the paper sets no effective lower bound and
       tunes ε_high without publishing it; ε_high = 4 (weights ≤ 5) is our choice, inside the range
       peers use (SkyRL's default clamp [1, 6], Tinker's [0, 4]).
    4. token-mean aggregation (the paper normalises by the batch's total token count).
    5. No dual clip, no KL term, no entropy bonus.
    """

    def __init__(
        self,
        clip: tuple[float, float] = (1.0, 4.0),
        loss_agg: AggregationMode = "token-mean",
        kl_coef: float = 0.0,
        kl_estimator: KLEstimator = "low_var_kl",
        rho: float = 0.8,
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            clip: (ε_low, ε_high) bounds of the detached importance weight.
            loss_agg: aggregation mode of the PG and KL terms.
            kl_coef: β, KL-to-reference coefficient over all valid tokens.
            kl_estimator: per-token KL estimator (k1, k2, k3 / low_var_kl).
            rho: entropy quantile for the per-type diagnostics only.
            entropy_coef: entropy bonus coefficient (0: none).
        """
        super().__init__(kl_coef, kl_estimator, loss_agg, rho, entropy_coef)
        self.clip = tuple(clip)

    def _compute(self, logprob, old_logprob, ref_logprob, advantages, entropy, response_mask, **options):
        return cispo_loss(
            logprob, old_logprob, advantages, response_mask, clip=self.clip, loss_agg=self.loss_agg,
            ref_logprob=ref_logprob, kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy=entropy,
            rho=self.rho, **options,
        )


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
    4. DAPO's clip-higher (0.2, 0.28), token-mean, no KL, dual clip c = 10, no entropy bonus (an
       entropy bonus, if set, runs over all valid tokens).
    """

    def __init__(
        self,
        rho: float = 0.8,
        level: Literal["response", "batch"] = "batch",
        clip: tuple[float, float] = (0.2, 0.28),
        dual_clip: float | None = 10.0,
        loss_agg: AggregationMode = "token-mean",
        entropy_coef: float = 0.0,
    ) -> None:
        """
        Args:
            rho: entropy quantile; only tokens strictly above it get policy gradient.
            level: where the quantile is taken: over each response or over the batch.
            clip: (ε_low, ε_high) clip band.
            dual_clip: dual-clip constant c for negative advantages (None disables).
            loss_agg: aggregation mode of the PG term (over the kept tokens).
            entropy_coef: entropy bonus coefficient (0: none).
        """
        super().__init__(loss_agg, rho, entropy_coef)
        self.level = level
        self.clip = tuple(clip)
        self.dual_clip = dual_clip

    @property
    def needs_minibatch_forward(self) -> bool:
        return True  # which tokens are kept (and so the units they count) depends on the entropies

    def minibatch_context(
        self, response_mask: Tensor, collectives: Collectives, *, entropy: Tensor | None = None,
        logprob: Tensor | None = None, old_logprob: Tensor | None = None, advantages: Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        mask = response_mask.bool()
        context = {"entropy_units": super().minibatch_context(mask, collectives)["units"]} if self.entropy_coef else {}
        if self.level == "response":
            kept = classify_tokens(entropy, mask, self.rho)
            return {**context, "units": collectives.sum(agg_units(kept, self.loss_agg))}
        pooled = collectives.cat(entropy.detach().double()[mask]).unsqueeze(0)  # every rank's valid tokens
        threshold = entropy_threshold(pooled, torch.ones_like(pooled, dtype=torch.bool), self.rho, level="batch")
        kept = (entropy.detach().double() > threshold) & mask
        return {**context, "threshold": threshold, "units": collectives.sum(agg_units(kept, self.loss_agg))}

    def _compute(self, logprob, old_logprob, ref_logprob, advantages, entropy, response_mask, **options):
        return high_entropy_mask_loss(
            logprob, old_logprob, advantages, entropy, response_mask,
            rho=self.rho, level=self.level, clip=self.clip, dual_clip=self.dual_clip, loss_agg=self.loss_agg, **options,
        )
