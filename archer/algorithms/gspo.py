"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071), GSPO-token form.

The importance ratio is one per response: the geometric mean of its tokens' ratios. Per response
i with valid tokens {t : m_t = 1} (n_i of them), δ_t = ℓ_t − ℓ^old_t::

    s_i     = exp(clamp(mean_t δ_t, −20, 20))
    s_{i,t} = sg(s_i) · exp(ℓ_t − sg(ℓ_t))                 value s_i, gradient s_i · ∇ℓ_t
    pg_{i,t} = max(−A_{i,t} · s_{i,t}, −A_{i,t} · clip(s_{i,t}, 1 − ε⁻, 1 + ε⁺))
    loss    = seq-mean-token-mean of pg  (responses without a valid token do not count)

Per-token advantages A_{i,t} are allowed (GSPO-token). With one advantage A_i per response the
loss equals the sequence-level objective −mean_i min(s_i A_i, clip(s_i, 1 − ε⁻, 1 + ε⁺) A_i),
gradients included: (1/n_i) Σ_t s_i ∇ℓ_t = ∇s_i, and since every token of a response has the same
ratio, the clip is decided per response. Paper defaults: (ε⁻, ε⁺) = (3·10⁻⁴, 4·10⁻⁴) (the ratio
of a geometric mean moves far less than a token ratio), no dual clip, no KL. The clamp at ±20,
on the mean, only keeps exp() finite (as for r_t elsewhere); single tokens are not clamped. Stats: ratio_mean is the token mean of s_i; clipfrac
counts the tokens of clipped responses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archer.algorithms.kl import KLEstimator
from archer.algorithms.policy_loss import Units, _check_clip, _check_shapes, clipped_surrogate, surrogate_loss
from archer.algorithms.stats import Ratio

__all__ = ["gspo_loss"]


def gspo_loss(
    logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip: tuple[float, float] = (3e-4, 4e-4),
    ref_logprob: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "low_var_kl",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    rho: float = 0.8,
    units: Units = None,
    pg_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Ratio]]:
    """GSPO-token loss (module docstring) ``+ kl_coef · agg(KL_t) − entropy_coef · agg(H_t)``, all seq-mean-token-mean.

    ``clip = (ε⁻, ε⁺)``; ``advantages`` ``[B]`` or ``[B, T]``; ``units``: the number of responses
    with a valid token over the whole mini-batch on all ranks (None: in these tensors);
    ``pg_weight``, ``entropy_coef``, ``kl_coef`` and the diagnostics typing at ``rho`` as in
    :func:`~archer.algorithms.policy_loss.surrogate_loss`.
    """
    _check_shapes(response_mask, logprob=logprob, old_logprob=old_logprob, ref_logprob=ref_logprob, entropy=entropy)
    _check_clip("clip", clip)
    mask = response_mask.bool()
    log_ratio = torch.where(mask, logprob - old_logprob.detach(), 0.0)  # δ_t, 0 at padding; clamped after the mean
    sequence_log_ratio = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)  # log s_i, [B]
    token_log_ratio = sequence_log_ratio.detach().unsqueeze(-1) + (logprob - logprob.detach())  # log s_{i,t}
    surrogate = clipped_surrogate(
        token_log_ratio, torch.zeros_like(token_log_ratio), advantages, mask, clip_low=clip[0], clip_high=clip[1],
        dual_clip=None,
    )
    return surrogate_loss(
        surrogate, logprob, old_logprob, mask, loss_agg="seq-mean-token-mean", units=units, pg_weight=pg_weight,
        ref_logprob=ref_logprob, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy=entropy,
        entropy_coef=entropy_coef, rho=rho,
    )
