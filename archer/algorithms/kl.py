"""Per-token KL penalties between the current policy and the reference policy (as a loss term).

With ℓ = log π(y_t) (current, carries the gradient) and ℓ_ref = log π_ref(y_t), tokens sampled
from π (Schulman, "Approximating KL divergence", 2020; names as in verl ``kl_penalty``)::

    k1          ℓ − ℓ_ref
    k2          ½ (ℓ − ℓ_ref)²
    k3          d = clamp(ℓ_ref − ℓ, −20, 20);  clamp(exp(d) − d − 1, −10, 10)
    low_var_kl  = k3 (verl's name for it)

The clamps are verl's: they keep exp() finite and bound one token's penalty when a rare token's
log-prob drifts far; tokens in the clamped region get zero gradient, as in verl.

Archer and GRPO use the KL as a loss term (gradient through ℓ). The alternative, KL in the reward
(:func:`kl_in_reward`, PPO/RLHF style), subtracts a detached penalty from each response's reward
before advantages are computed, with the old policy's log-probs (the sampling policy)::

    r̃_i = r_i − β · Σ_t m_t · k(ℓ^old_t, ℓ^ref_t)        k: one of the estimators above

Use one or the other, not both (the loss's KL coefficient 0 with ``kl_in_reward``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["kl_penalty", "kl_in_reward", "KLEstimator"]

KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL estimate ``[B, T]`` (formulas in the module docstring); gradient flows through ``logprob``."""
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ in shape")
    ref_logprob = ref_logprob.detach()
    if estimator == "k1":
        return logprob - ref_logprob
    if estimator == "k2":
        return 0.5 * (logprob - ref_logprob).square()
    if estimator in ("k3", "low_var_kl"):
        log_ratio = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2', 'k3' or 'low_var_kl'")


def kl_in_reward(
    rewards: Tensor,
    old_logprob: Tensor,
    ref_logprob: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    estimator: KLEstimator = "low_var_kl",
) -> Tensor:
    """``r_i − β · Σ_t k(ℓ^old_t, ℓ^ref_t)`` over response i's valid tokens (module docstring), ``[N]``.

    ``rewards`` ``[N]``; ``old_logprob``, ``ref_logprob``, ``response_mask`` ``[N, T]``. Detached, in
    ``rewards``' dtype; padding is replaced before the arithmetic (it contributes 0).
    """
    if rewards.dim() != 1 or response_mask.dim() != 2 or rewards.shape[0] != response_mask.shape[0]:
        raise ValueError(f"rewards must be [N] and response_mask [N, T]; got {tuple(rewards.shape)} and {tuple(response_mask.shape)}")
    if old_logprob.shape != response_mask.shape:
        raise ValueError(f"old_logprob {tuple(old_logprob.shape)} must have response_mask's shape {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    with torch.no_grad():
        ref = ref_logprob.detach().double()
        per_token = kl_penalty(torch.where(mask, old_logprob.detach().double(), ref), ref, estimator)
        penalty = torch.where(mask, per_token, 0.0).sum(dim=-1)
        return (rewards.detach().double() - beta * penalty).to(rewards.dtype)
