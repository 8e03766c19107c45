"""Per-token KL penalties between the current policy and the reference policy (as a loss term).

With ℓ = log π(y_t) (current, carries the gradient) and ℓ_ref = log π_ref(y_t), tokens sampled
from π (Schulman, "Approximating KL divergence", 2020; names as in verl ``kl_penalty``)::

    k1          ℓ − ℓ_ref
    k2          ½ (ℓ − ℓ_ref)²
    k3          d = clamp(ℓ_ref − ℓ, −20, 20);  clamp(exp(d) − d − 1, −10, 10)
    low_var_kl  = k3 (verl's name for it)

The clamps are verl's: they keep exp() finite and bound one token's penalty when a rare token's
log-prob drifts far; tokens in the clamped region get zero gradient, as in verl.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["kl_penalty", "KLEstimator"]

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
