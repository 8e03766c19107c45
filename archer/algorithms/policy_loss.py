"""Clipped policy-gradient losses: vanilla PPO/GRPO/DAPO, Archer's dual-token loss, 80/20 masking.

All three share ONE surrogate (:func:`clipped_surrogate`) fed with a per-token clip band, and
differ only in which tokens get which band, which tokens the PG aggregate runs over, and how the
KL term is normalised. Per valid token t (mask m_t = 1), with A_t the advantage::

    r_t   = exp(clamp(ℓ_t − ℓ^old_t, −20, 20))
    pg_t  = max(−A_t · r_t, −A_t · clip(r_t, 1 − ε⁻_t, 1 + ε⁺_t))
    pg_t  = min(pg_t, −c · A_t)        if A_t < 0 and dual clip c is set (Ye et al. 2020)
    loss  = agg(pg_t over the PG tokens) + KL terms

* vanilla (:func:`clipped_policy_loss`): one band (ε⁻, ε⁺) for every token (DAPO clip-higher:
  (0.2, 0.28)); KL, if any, is one aggregate over all valid tokens.
* Archer (:func:`dual_token_loss`, arXiv 2507.15778): tokens typed by per-response entropy
  quantile (:func:`~archer.algorithms.token_typing.classify_tokens`); knowledge tokens get the
  tight band (0.2, 0.2) and KL β_k = 0.001, reasoning tokens the loose band (0.5, 0.5) and
  β_r = 0. The PG term is ONE aggregate over all valid tokens; each type's KL is aggregated
  over that type's tokens only (normalised by its own count).
* 80/20 (:func:`high_entropy_mask_loss`, arXiv 2506.01939): PG only through tokens whose
  entropy is above the ρ-quantile (per response or over the batch); the aggregate runs over
  those kept tokens, so it equals the vanilla loss computed on the kept tokens alone.

Options of every policy loss here and in :mod:`.gspo`, :mod:`.cispo`:

* ``pg_weight`` w_t (``[B, T]``, detached; e.g. the rollout-correction weights of
  :mod:`.rollout_correction`): pg_t ← w_t · pg_t before aggregation. The aggregation's unit
  counts do not change and KL terms are not weighted.
* ``entropy_coef``: loss ← loss − coef · agg(H_t) over the valid tokens (:func:`entropy_bonus`),
  with the gradient through H_t, so ``entropy`` must carry it (``token_logprobs_and_entropy(...,
  entropy_grad=True)``). Token typing always uses the detached entropy.
* Clip-Cov / KL-Cov (:mod:`.covariance`) are options of :func:`clipped_policy_loss` (``cov``).

Shapes: logprob, old_logprob, ref_logprob, entropy, pg_weight, response_mask ``[B, T]``;
advantages ``[B]`` or ``[B, T]``. Every loss returns ``(loss, stats)`` with the same
:data:`STAT_KEYS`, each a :class:`~archer.algorithms.stats.Ratio`.

Micro-batches and ranks. Each aggregate divides by a unit count (:mod:`.aggregation`). By default
that is the count in the tensors given; the ``*units`` arguments replace it with the count over
the whole mini-batch on all ranks, so that the losses of its micro-batches add up to the loss of
the mini-batch exactly (the trainer computes them; see ``PolicyLoss.minibatch_context``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from archer.algorithms.aggregation import AggregationMode, agg_loss, agg_parts
from archer.algorithms.covariance import ClipCov, Gather, KLCov, select_cov_tokens
from archer.algorithms.kl import KLEstimator, kl_penalty
from archer.algorithms.stats import Ratio, masked_ratio
from archer.algorithms.token_typing import classify_tokens, entropy_threshold

__all__ = [
    "STAT_KEYS", "Surrogate", "clipped_surrogate", "surrogate_loss", "entropy_bonus", "clipped_policy_loss",
    "clipped_cov_tokens", "dual_token_loss", "high_entropy_mask_loss",
]

STAT_KEYS: tuple[str, ...] = (
    "pg_loss", "kl", "clipfrac", "clipfrac_reasoning", "clipfrac_knowledge", "kl_reasoning", "kl_knowledge",
    "reasoning_fraction", "entropy_reasoning", "entropy_knowledge", "entropy", "ratio_mean", "approx_kl",
)
"""Keys of the stats dict every policy loss returns (see :func:`_diagnostics` for their meaning)."""

Units = Tensor | float | None
"""A unit count to divide an aggregate by (None: the count in the tensors given)."""


@dataclass
class Surrogate:
    """Per-token pieces of the clipped surrogate, all ``[B, T]``."""

    pg: Tensor
    """pg_t, the per-token loss (0 at padding); carries the gradient."""
    clipped: Tensor
    """bool: the ratio clip or the dual clip changed pg_t (so the token gets no gradient), False at padding."""
    ratio: Tensor
    """The importance ratio the surrogate clips (r_t; GSPO's s_i on every token of response i), detached."""


def _check_shapes(response_mask: Tensor, **tensors: Tensor | None) -> None:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got {tuple(response_mask.shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != response_mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(response_mask.shape)} like response_mask")


def _token_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Advantages ``[B]`` (one per response) or ``[B, T]`` → ``[B, T]``, detached."""
    if advantages.dim() == 1 and advantages.shape[0] == response_mask.shape[0]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != response_mask.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(response_mask.shape)}, got {tuple(advantages.shape)}")
    return advantages.detach().expand_as(response_mask)


def _check_clip(name: str, clip: tuple[float, float]) -> None:
    if len(clip) != 2 or min(clip) < 0:
        raise ValueError(f"{name} must be a pair (ε_low, ε_high) of non-negative floats, got {clip}")
    if clip[0] > 1:
        raise ValueError(f"{name}[0] = {clip[0]} would clip the ratio below at 1 − ε < 0 (ε_low = 1: no lower clip)")


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def _check_terms(kl_coef: float, ref_logprob: Tensor | None, entropy_coef: float, entropy: Tensor | None) -> None:
    if kl_coef > 0 and ref_logprob is None:
        raise ValueError(f"kl_coef = {kl_coef} > 0 needs ref_logprob")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef = {entropy_coef} needs entropy (with its gradient)")


def _log_ratio(logprob: Tensor, old_logprob: Tensor, mask: Tensor) -> Tensor:
    """δ_t = clamp(ℓ_t − ℓ^old_t, −20, 20) at valid tokens, 0 at padding (replaced before the arithmetic);
    the gradient flows through ℓ_t only."""
    return torch.where(mask, logprob - old_logprob.detach(), 0.0).clamp(-20.0, 20.0)


def clipped_surrogate(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: Tensor | float,
    clip_high: Tensor | float,
    dual_clip: float | None,
) -> Surrogate:
    """The shared surrogate (module docstring) with a per-token band ``clip_low``/``clip_high`` (``[B, T]`` or scalar).

    Padding is replaced before any arithmetic (Δ = 0, A = 0), so whatever values sit there never
    reach the loss or the gradient.
    """
    mask = response_mask.bool()
    token_adv = torch.where(mask, _token_advantages(advantages, response_mask), 0.0)
    ratio = torch.exp(_log_ratio(logprob, old_logprob, mask))
    lower = 1.0 - torch.as_tensor(clip_low, dtype=ratio.dtype, device=ratio.device)
    upper = 1.0 + torch.as_tensor(clip_high, dtype=ratio.dtype, device=ratio.device)
    unclipped = -token_adv * ratio
    pg = torch.maximum(unclipped, -token_adv * torch.clamp(ratio, lower, upper))
    if dual_clip is not None:
        pg = torch.where(token_adv < 0, torch.minimum(pg, -dual_clip * token_adv), pg)
    clipped = (pg.detach() != unclipped.detach()) & mask
    return Surrogate(pg=pg, clipped=clipped, ratio=ratio.detach())


def _weighted(surrogate: Surrogate, pg_weight: Tensor | None, mask: Tensor) -> Surrogate:
    """pg_t ← w_t · pg_t (w detached, replaced by 0 at padding so that no NaN there reaches a gradient)."""
    if pg_weight is None:
        return surrogate
    if pg_weight.shape != mask.shape:
        raise ValueError(f"pg_weight has shape {tuple(pg_weight.shape)}, expected {tuple(mask.shape)} like response_mask")
    weight = torch.where(mask, pg_weight.detach(), 0.0).to(surrogate.pg.dtype)
    return replace(surrogate, pg=surrogate.pg * weight)


def entropy_bonus(
    entropy: Tensor,
    response_mask: Tensor,
    *,
    coef: float,
    loss_agg: AggregationMode = "token-mean",
    norm_len: int | None = None,
    units: Units = None,
) -> Tensor:
    """Entropy bonus term ``−coef · agg(H_t)`` over the valid tokens (``loss_agg``; ``units`` as in
    :func:`~archer.algorithms.aggregation.agg_loss`). The gradient flows through ``entropy`` ``[B, T]``,
    so it must come from a differentiable entropy (the losses add this term only when coef ≠ 0)."""
    return -coef * agg_loss(entropy, response_mask.bool(), loss_agg, norm_len=norm_len, units=units)


def _diagnostics(
    surrogate: Surrogate,
    pg_tokens: Tensor,
    reasoning: Tensor | None,
    entropy: Tensor | None,
    kl_per_token: Tensor | None,
    response_mask: Tensor,
    loss_agg: AggregationMode,
    norm_len: int | None,
    logprob: Tensor,
    old_logprob: Tensor,
) -> dict[str, Ratio]:
    """The :data:`STAT_KEYS` stats as :class:`Ratio` (numerator, denominator) pairs.

    pg_loss: the PG aggregate over the PG tokens (``loss_agg``, weights included). clipfrac*:
    fraction of PG tokens (of that type) whose surrogate took a clipped branch. kl*: the KL estimator
    aggregated with ``loss_agg`` over all valid / reasoning / knowledge tokens (0 / 0 without
    reference log-probs). entropy*: token means (0 / 0 without entropies). reasoning_fraction:
    reasoning tokens / valid tokens. ratio_mean: token mean of the surrogate's ratio. approx_kl:
    token mean of k3 between π_old and π, (r_t − 1) − δ_t ≥ 0. A stat with nothing to measure (no
    token of that type) is 0 / 0.
    """
    mask = response_mask.bool()
    with torch.no_grad():
        if reasoning is None:
            reasoning = torch.zeros_like(mask)
        knowledge = mask & ~reasoning
        log_ratio = _log_ratio(logprob, old_logprob, mask).double()
        nothing = Ratio.of(0.0, 0.0)

        def agg_over(values: Tensor | None, tokens: Tensor) -> Ratio:
            return nothing if values is None else Ratio.of(*agg_parts(values.detach(), tokens, loss_agg, norm_len=norm_len))

        def entropy_over(tokens: Tensor) -> Ratio:
            return nothing if entropy is None else masked_ratio(entropy, tokens)

        clipped = surrogate.clipped
        return {
            "pg_loss": agg_over(surrogate.pg, pg_tokens),
            "kl": agg_over(kl_per_token, mask),
            "clipfrac": masked_ratio(clipped, pg_tokens),
            "clipfrac_reasoning": masked_ratio(clipped, pg_tokens & reasoning),
            "clipfrac_knowledge": masked_ratio(clipped, pg_tokens & knowledge),
            "kl_reasoning": agg_over(kl_per_token, reasoning),
            "kl_knowledge": agg_over(kl_per_token, knowledge),
            "reasoning_fraction": masked_ratio(reasoning, mask),
            "entropy_reasoning": entropy_over(reasoning),
            "entropy_knowledge": entropy_over(knowledge),
            "entropy": entropy_over(mask),
            "ratio_mean": masked_ratio(surrogate.ratio, mask),
            "approx_kl": masked_ratio(torch.expm1(log_ratio) - log_ratio, mask),
        }


def _kl_per_token(logprob: Tensor, ref_logprob: Tensor | None, response_mask: Tensor, estimator: KLEstimator) -> Tensor | None:
    """KL estimator at valid tokens, 0 at padding (padding replaced before the arithmetic); None without a reference."""
    if ref_logprob is None:
        return None
    mask = response_mask.bool()
    ref = ref_logprob.detach()
    return kl_penalty(torch.where(mask, logprob, ref), ref, estimator)


def surrogate_loss(
    surrogate: Surrogate,
    logprob: Tensor,
    old_logprob: Tensor,
    response_mask: Tensor,
    *,
    loss_agg: AggregationMode,
    norm_len: int | None = None,
    units: Units = None,
    pg_weight: Tensor | None = None,
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "low_var_kl",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    rho: float = 0.8,
) -> tuple[Tensor, dict[str, Ratio]]:
    """A per-token surrogate → ``(loss, stats)`` with ONE aggregate over all valid tokens::

        loss = agg(w_t · pg_t) + β · agg(KL_t) − coef · agg(H_t)

    The tail shared by :func:`clipped_policy_loss`, :func:`~archer.algorithms.gspo.gspo_loss` and
    :func:`~archer.algorithms.cispo.cispo_loss`: ``pg_weight`` = w, ``kl_coef`` = β (needs
    ``ref_logprob``), ``entropy_coef`` = coef (needs ``entropy`` with its gradient), ``units``
    divides all three aggregates (module docstring). ``entropy`` also types tokens at ``rho`` for
    the per-type diagnostics only.
    """
    _check_terms(kl_coef, ref_logprob, entropy_coef, entropy)
    mask = response_mask.bool()
    surrogate = _weighted(surrogate, pg_weight, mask)
    loss = agg_loss(surrogate.pg, mask, loss_agg, norm_len=norm_len, units=units)
    kl_t = _kl_per_token(logprob, ref_logprob, mask, kl_estimator)
    if kl_coef > 0:
        loss = loss + kl_coef * agg_loss(kl_t, mask, loss_agg, norm_len=norm_len, units=units)
    if entropy_coef != 0:
        loss = loss + entropy_bonus(entropy, mask, coef=entropy_coef, loss_agg=loss_agg, norm_len=norm_len, units=units)
    reasoning = None if entropy is None else classify_tokens(entropy, mask, rho)
    stats = _diagnostics(surrogate, mask, reasoning, entropy, kl_t, mask, loss_agg, norm_len, logprob, old_logprob)
    return loss, stats


def _with_cov(surrogate: Surrogate, cov: ClipCov | KLCov, chosen: Tensor, log_ratio: Tensor) -> Surrogate:
    """Clip-Cov: pg_t = 0 on the chosen tokens (counted as clipped). KL-Cov: pg_t += β·|δ_t| on them."""
    if isinstance(cov, ClipCov):
        return replace(surrogate, pg=torch.where(chosen, 0.0, surrogate.pg), clipped=surrogate.clipped | chosen)
    return replace(surrogate, pg=surrogate.pg + torch.where(chosen, cov.coef * log_ratio.abs(), 0.0))


def _single_band_surrogate(
    logprob: Tensor, old_logprob: Tensor, advantages: Tensor, mask: Tensor, clip: tuple[float, float] | None,
    dual_clip: float | None,
) -> Surrogate:
    """:func:`clipped_surrogate` with one band ``clip`` (None: no ratio clip, i.e. the band [0, ∞))."""
    if clip is not None:
        _check_clip("clip", clip)
    _check_dual_clip(dual_clip)
    clip_low, clip_high = (1.0, float("inf")) if clip is None else clip
    return clipped_surrogate(logprob, old_logprob, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


def clipped_cov_tokens(
    cov: ClipCov | KLCov,
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip: tuple[float, float] | None,
    dual_clip: float | None,
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
) -> Tensor:
    """The tokens ``cov`` acts on in :func:`clipped_policy_loss` with these ``clip`` / ``dual_clip``
    settings, bool ``[B, T]``: :func:`~archer.algorithms.covariance.select_cov_tokens` with the
    surrogate's clipped tokens excluded (Clip-Cov). ``gather`` spans several ranks (the mini-batch
    context); ``generator`` draws the per-token keys (Clip-Cov's random choice, KL-Cov's tie-break).
    """
    mask = response_mask.bool()
    with torch.no_grad():
        excluded = None
        if isinstance(cov, ClipCov):
            excluded = _single_band_surrogate(logprob.detach(), old_logprob, advantages, mask, clip, dual_clip).clipped
        token_adv = _token_advantages(advantages, mask)
        return select_cov_tokens(cov, logprob, token_adv, mask, excluded=excluded, generator=generator, gather=gather)


def clipped_policy_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip: tuple[float, float] | None = (0.2, 0.2),
    dual_clip: float | None = 10.0,
    loss_agg: AggregationMode = "token-mean",
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "low_var_kl",
    norm_len: int | None = None,
    entropy: Tensor | None = None,
    rho: float = 0.8,
    units: Units = None,
    pg_weight: Tensor | None = None,
    entropy_coef: float = 0.0,
    cov: ClipCov | KLCov | None = None,
    cov_tokens: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Ratio]]:
    """Vanilla PPO/GRPO/DAPO: ``agg(w_t·pg_t) + kl_coef · agg(KL_t) − entropy_coef · agg(H_t)`` with one clip band.

    ``clip = (ε⁻, ε⁺)`` (None: no ratio clip, pg_t = −A_t r_t); ``dual_clip = c`` (None disables);
    ``kl_coef`` = β (needs ``ref_logprob``); ``entropy`` (optional unless ``entropy_coef`` ≠ 0)
    types tokens at ``rho`` for the per-type diagnostics; ``units`` divides the aggregates and
    ``pg_weight`` weighs pg_t (module docstring).

    ``cov``: Clip-Cov or KL-Cov (:mod:`~archer.algorithms.covariance`). Clip-Cov sets pg_t = 0 on
    its chosen tokens (reported as clipped); KL-Cov adds β·|δ_t| to pg_t on its tokens (so the
    penalty is part of pg_t: weighted by w_t and reported in pg_loss, as in verl).
    ``cov_tokens`` (bool ``[B, T]``): the chosen tokens, selected over a larger batch (the
    mini-batch context); None selects them over this batch, with keys from ``generator`` (Clip-Cov's
    random choice, KL-Cov's tie-break; None: torch's global generator). Clip-Cov candidates exclude
    tokens this surrogate already clips.
    """
    _check_shapes(
        response_mask, logprob=logprob, old_logprob=old_logprob, ref_logprob=ref_logprob, entropy=entropy,
        cov_tokens=cov_tokens,
    )
    mask = response_mask.bool()
    surrogate = _single_band_surrogate(logprob, old_logprob, advantages, mask, clip, dual_clip)
    if cov is not None:
        if cov_tokens is None:
            cov_tokens = clipped_cov_tokens(
                cov, logprob, old_logprob, advantages, mask, clip=clip, dual_clip=dual_clip, generator=generator
            )
        surrogate = _with_cov(surrogate, cov, cov_tokens.bool() & mask, _log_ratio(logprob, old_logprob, mask))
    return surrogate_loss(
        surrogate, logprob, old_logprob, mask, loss_agg=loss_agg, norm_len=norm_len, units=units, pg_weight=pg_weight,
        ref_logprob=ref_logprob, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy=entropy,
        entropy_coef=entropy_coef, rho=rho,
    )


def dual_token_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    ref_logprob: Tensor | None,
    advantages: Tensor,
    entropy: Tensor,
    response_mask: Tensor,
    *,
    rho: float = 0.8,
    knowledge_clip: tuple[float, float] = (0.2, 0.2),
    reasoning_clip: tuple[float, float] = (0.5, 0.5),
    knowledge_kl: float = 0.001,
    reasoning_kl: float = 0.0,
    dual_clip: float | None = 10.0,
    kl_estimator: KLEstimator = "low_var_kl",
    loss_agg: AggregationMode = "token-mean",
    norm_len: int | None = None,
    units: Units = None,
    knowledge_units: Units = None,
    reasoning_units: Units = None,
    pg_weight: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Ratio]]:
    """Archer's dual-token loss (arXiv 2507.15778): ``agg(pg_t) + β_k·KL_know + β_r·KL_reas``.

    Reasoning tokens = ``classify_tokens(entropy, response_mask, rho)`` (H_t above its response's
    ρ-quantile); knowledge tokens = the other valid tokens. Knowledge tokens use
    ``knowledge_clip`` (ε⁻, ε⁺) and β_k = ``knowledge_kl``; reasoning tokens ``reasoning_clip`` and
    β_r = ``reasoning_kl``. PG is one aggregate over all valid tokens; KL_know / KL_reas are the
    same aggregation restricted to that type's tokens. ``ref_logprob`` may be None only if both β are 0.
    ``units`` / ``knowledge_units`` / ``reasoning_units`` divide the PG (and entropy bonus) / KL_know /
    KL_reas aggregates; ``pg_weight`` and ``entropy_coef`` as in the module docstring.
    """
    _check_shapes(response_mask, logprob=logprob, old_logprob=old_logprob, ref_logprob=ref_logprob, entropy=entropy)
    _check_clip("knowledge_clip", knowledge_clip)
    _check_clip("reasoning_clip", reasoning_clip)
    _check_dual_clip(dual_clip)
    if (knowledge_kl > 0 or reasoning_kl > 0) and ref_logprob is None:
        raise ValueError(f"knowledge_kl = {knowledge_kl} / reasoning_kl = {reasoning_kl} > 0 need ref_logprob")
    mask = response_mask.bool()
    reasoning = classify_tokens(entropy, mask, rho)
    knowledge = mask & ~reasoning
    surrogate = clipped_surrogate(
        logprob,
        old_logprob,
        advantages,
        mask,
        clip_low=torch.where(reasoning, reasoning_clip[0], knowledge_clip[0]),
        clip_high=torch.where(reasoning, reasoning_clip[1], knowledge_clip[1]),
        dual_clip=dual_clip,
    )
    surrogate = _weighted(surrogate, pg_weight, mask)
    loss = agg_loss(surrogate.pg, mask, loss_agg, norm_len=norm_len, units=units)
    kl_t = _kl_per_token(logprob, ref_logprob, mask, kl_estimator)
    if knowledge_kl > 0:
        loss = loss + knowledge_kl * agg_loss(kl_t, knowledge, loss_agg, norm_len=norm_len, units=knowledge_units)
    if reasoning_kl > 0:
        loss = loss + reasoning_kl * agg_loss(kl_t, reasoning, loss_agg, norm_len=norm_len, units=reasoning_units)
    if entropy_coef != 0:
        loss = loss + entropy_bonus(entropy, mask, coef=entropy_coef, loss_agg=loss_agg, norm_len=norm_len, units=units)
    stats = _diagnostics(surrogate, mask, reasoning, entropy, kl_t, mask, loss_agg, norm_len, logprob, old_logprob)
    return loss, stats


def high_entropy_mask_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    response_mask: Tensor,
    *,
    rho: float = 0.8,
    level: Literal["response", "batch"] = "response",
    clip: tuple[float, float] = (0.2, 0.28),
    dual_clip: float | None = 10.0,
    loss_agg: AggregationMode = "token-mean",
    norm_len: int | None = None,
    threshold: Tensor | float | None = None,
    units: Units = None,
    pg_weight: Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_units: Units = None,
) -> tuple[Tensor, dict[str, Ratio]]:
    """"80/20" (arXiv 2506.01939): PG only through tokens with H_t > q, aggregated over those tokens.

    q is the ρ-quantile of the valid tokens' entropies per response (``level="response"``, as
    Archer types tokens) or over the whole batch (``level="batch"``, the paper's choice).
    ``threshold``: a batch-level q computed elsewhere (over a mini-batch larger than these
    tensors, e.g. on all ranks); it replaces the one computed from ``entropy``. The kept tokens are
    reported as the "reasoning" type; the result equals :func:`clipped_policy_loss` with
    ``response_mask`` replaced by the kept tokens. ``units`` counts the kept tokens' units. No KL term.
    The entropy bonus (``entropy_coef``) runs over all valid tokens, divided by ``entropy_units``.
    """
    _check_shapes(response_mask, logprob=logprob, old_logprob=old_logprob, entropy=entropy)
    _check_clip("clip", clip)
    _check_dual_clip(dual_clip)
    mask = response_mask.bool()
    if threshold is None:
        threshold = entropy_threshold(entropy, mask, rho, level=level)
    kept = (entropy.detach().double() > threshold) & mask
    surrogate = clipped_surrogate(
        logprob, old_logprob, advantages, mask, clip_low=clip[0], clip_high=clip[1], dual_clip=dual_clip
    )
    surrogate = _weighted(surrogate, pg_weight, mask)
    loss = agg_loss(surrogate.pg, kept, loss_agg, norm_len=norm_len, units=units)  # only the kept tokens count
    if entropy_coef != 0:
        loss = loss + entropy_bonus(entropy, mask, coef=entropy_coef, loss_agg=loss_agg, norm_len=norm_len, units=entropy_units)
    stats = _diagnostics(surrogate, kept, kept, entropy, None, mask, loss_agg, norm_len, logprob, old_logprob)
    return loss, stats
