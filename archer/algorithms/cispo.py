"""CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, never the gradient.

Per valid token t, with A_t the advantage::

    r_t  = exp(clamp(ℓ_t − ℓ^old_t, −20, 20))
    r̂_t  = sg(clip(r_t, 1 − ε⁻, 1 + ε⁺))
    pg_t = −r̂_t · A_t · ℓ_t                  gradient −r̂_t A_t ∇ℓ_t on EVERY token
    loss = agg(pg_t)                          token-mean by default

Unlike PPO, a token whose ratio leaves the band keeps its gradient (REINFORCE with a bounded
importance weight); only the weight is clipped. The value of pg_t is not a surrogate of the return
(it contains ℓ_t itself); only its gradient matters. Stats: clipfrac counts the tokens whose
weight was clipped (they still have a gradient); ratio_mean is the token mean of r_t.

Defaults: the paper sets no effective lower bound (a large ε⁻) and tunes ε⁺ without publishing
it. :class:`~archer.losses.CISPOLoss` uses (ε⁻, ε⁺) = (1.0, 4.0), i.e. r̂ ∈ [0, 5]: no lower
clip (r > 0) and an upper bound of 5 — our choice, inside the range peers use (SkyRL's default
clamp is [1, 6], Tinker's [0, 4]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archer.algorithms.aggregation import AggregationMode
from archer.algorithms.kl import KLEstimator
from archer.algorithms.policy_loss import (
    Surrogate,
    Units,
    _check_clip,
    _check_shapes,
    _log_ratio,
    _token_advantages,
    surrogate_loss,
)
from archer.algorithms.stats import Ratio

__all__ = ["cispo_loss"]


def cispo_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip: tuple[float, float],
    loss_agg: AggregationMode = "token-mean",
    norm_len: int | None = None,
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "low_var_kl",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    rho: float = 0.8,
    units: Units = None,
    pg_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Ratio]]:
    """CISPO loss (module docstring) ``+ kl_coef · agg(KL_t) − entropy_coef · agg(H_t)``.

    ``clip = (ε⁻, ε⁺)`` bounds the detached weight (ε⁻ = 1: no lower bound); ``units``,
    ``pg_weight``, ``entropy_coef``, ``kl_coef`` and the diagnostics typing at ``rho`` as in
    :func:`~archer.algorithms.policy_loss.surrogate_loss`.
    """
    _check_shapes(response_mask, logprob=logprob, old_logprob=old_logprob, ref_logprob=ref_logprob, entropy=entropy)
    _check_clip("clip", clip)
    mask = response_mask.bool()
    token_adv = torch.where(mask, _token_advantages(advantages, mask), 0.0)
    ratio = torch.exp(_log_ratio(logprob, old_logprob, mask)).detach()
    lower, upper = 1.0 - clip[0], 1.0 + clip[1]
    weight = ratio.clamp(lower, upper)
    pg = -weight * token_adv * torch.where(mask, logprob, 0.0)
    clipped = ((ratio < lower) | (ratio > upper)) & mask
    return surrogate_loss(
        Surrogate(pg=pg, clipped=clipped, ratio=ratio), logprob, old_logprob, mask, loss_agg=loss_agg,
        norm_len=norm_len, units=units, pg_weight=pg_weight, ref_logprob=ref_logprob, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy=entropy, entropy_coef=entropy_coef, rho=rho,
    )
