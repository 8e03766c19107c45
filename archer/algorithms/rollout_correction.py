"""Rollout–training mismatch correction: importance weights between the engine's and the trainer's policy.

The rollout engine samples from π_roll (its kernels, its dtype); the trainer's old log-probs ℓ^old
are π_old's of the same tokens. Per valid token (mask m_t = 1) of response i::

    δ_t = ℓ^old_t − ℓ^roll_t                   (0 at padding)
    token      ρ_t = exp(clamp(δ_t, −20, 20))
    sequence   ρ_i = exp(clamp(Σ_t δ_t, −20, 20))        the same on every token of response i
    geometric  ρ_i = exp(clamp(mean_t δ_t, −20, 20))     mean over the response's valid tokens

    truncate (TIS)            w = min(ρ, upper)
    mask (MIS, IcePop-style)  w = ρ if lower ≤ ρ ≤ upper else 0      lower defaults to 1/upper

The mask keeps the importance weight inside the band (TRL's ``token_mask`` / ``sequence_mask``,
verl's IS weights × rejection mask): a weight of 1 there would be the rejection mask alone, which
drops the outliers but leaves the kept tokens uncorrected (biased).

w is detached and 0 at padding. It multiplies the per-token policy-gradient term pg_t of whichever
loss runs (their ``pg_weight`` argument), before aggregation: the aggregation's unit counts do not
change and KL terms are not weighted. Peers: TRL's default is a sequence-level mask with cap 3,
verl's ``rollout_is`` threshold 2.0, slime's ``--tis-clip 2.0`` (token truncation); the default
here is token truncation at 2.0.

Metrics (:func:`rollout_mismatch_stats`): mismatch_kl = token mean of k3 = exp(δ_t) − δ_t − 1
(≥ 0, an estimate of KL(π_roll ‖ π_old) over the engine's samples), is_weight_mean = mean of w,
is_affected_fraction = fraction truncated (ρ > upper) or masked (w = 0; inside the band w = ρ > 0). The last two are over
tokens at the token level, over responses (with a valid token) at the sequence and geometric levels.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from archer.algorithms.stats import Ratio, masked_ratio

__all__ = ["CorrectionLevel", "CorrectionMode", "rollout_correction_weights", "rollout_mismatch_stats"]

CorrectionLevel = Literal["token", "sequence", "geometric"]
CorrectionMode = Literal["truncate", "mask"]


def _check(old_logprob: Tensor, rollout_logprob: Tensor, response_mask: Tensor, level: str, mode: str, upper: float) -> None:
    if response_mask.dim() != 2 or old_logprob.shape != response_mask.shape or rollout_logprob.shape != response_mask.shape:
        raise ValueError(
            f"old_logprob {tuple(old_logprob.shape)}, rollout_logprob {tuple(rollout_logprob.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be the same [B, T]"
        )
    if level not in ("token", "sequence", "geometric"):
        raise ValueError(f"level must be 'token', 'sequence' or 'geometric', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if not upper > 0:
        raise ValueError(f"upper must be > 0, got {upper}")


def _ratio(old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor, level: CorrectionLevel) -> tuple[Tensor, Tensor]:
    """``(ρ, δ)``, float64 ``[B, T]`` (ρ per token or broadcast per response; δ = 0 at padding)."""
    delta = torch.where(mask, old_logprob.detach().double() - rollout_logprob.detach().double(), 0.0)
    if level == "token":
        log_ratio = delta
    else:
        log_ratio = delta.sum(dim=-1, keepdim=True)
        if level == "geometric":
            log_ratio = log_ratio / mask.sum(dim=-1, keepdim=True).clamp_min(1)
        log_ratio = log_ratio.expand_as(delta)
    return torch.exp(log_ratio.clamp(-20.0, 20.0)), delta


def _lower_bound(upper: float, lower: float | None) -> float:
    """The mask's lower bound (default 1/upper), checked against ``upper``."""
    lower = 1.0 / upper if lower is None else lower
    if lower > upper:
        raise ValueError(f"lower = {lower} > upper = {upper}")
    return lower


def rollout_correction_weights(
    old_logprob: Tensor,
    rollout_logprob: Tensor,
    response_mask: Tensor,
    *,
    level: CorrectionLevel = "token",
    mode: CorrectionMode = "truncate",
    upper: float = 2.0,
    lower: float | None = None,
) -> Tensor:
    """Per-token weights w ``[B, T]`` (module docstring), detached, 0 at padding, in ``old_logprob``'s dtype.

    ``old_logprob`` (trainer) and ``rollout_logprob`` (engine) ``[B, T]``; ``response_mask`` ``[B, T]``
    bool or 0/1. ``lower`` is used by ``mode="mask"`` only (default 1/upper).
    """
    _check(old_logprob, rollout_logprob, response_mask, level, mode, upper)
    mask = response_mask.bool()
    ratio, _ = _ratio(old_logprob, rollout_logprob, mask, level)
    if mode == "truncate":
        weight = ratio.clamp(max=upper)
    else:
        weight = torch.where((ratio >= _lower_bound(upper, lower)) & (ratio <= upper), ratio, 0.0)
    return torch.where(mask, weight, 0.0).to(old_logprob.dtype)


def rollout_mismatch_stats(
    old_logprob: Tensor,
    rollout_logprob: Tensor,
    response_mask: Tensor,
    weights: Tensor,
    *,
    level: CorrectionLevel = "token",
    mode: CorrectionMode = "truncate",
    upper: float = 2.0,
) -> dict[str, Ratio]:
    """``mismatch_kl``, ``is_weight_mean``, ``is_affected_fraction`` as :class:`Ratio` (module docstring).

    ``weights``: what :func:`rollout_correction_weights` returned for the same ``level``, ``mode``
    and ``upper``. Ratios, so micro-batches and ranks add up (the trainer logs them as
    ``rollout/<key>``).
    """
    _check(old_logprob, rollout_logprob, response_mask, level, mode, upper)
    mask = response_mask.bool()
    ratio, delta = _ratio(old_logprob, rollout_logprob, mask, level)
    weights = weights.detach().double()
    affected = ratio > upper if mode == "truncate" else weights == 0
    clamped = delta.clamp(-20.0, 20.0)
    stats = {"mismatch_kl": masked_ratio(torch.expm1(clamped) - clamped, mask)}
    if level == "token":
        stats["is_weight_mean"] = masked_ratio(weights, mask)
        stats["is_affected_fraction"] = masked_ratio(affected, mask)
    else:  # one weight per response: read it at the response's first valid token; count responses with one
        responses = mask.any(dim=-1, keepdim=True)
        first = mask.double().argmax(dim=-1, keepdim=True)
        stats["is_weight_mean"] = masked_ratio(weights.gather(-1, first), responses)
        stats["is_affected_fraction"] = masked_ratio(affected.gather(-1, first), responses)
    return stats
