"""Clip-Cov and KL-Cov: which tokens they act on (Cui et al. 2025, arXiv 2505.22617).

The paper finds that, under policy gradient, a softmax policy's entropy changes like
−Cov(ℓ, A) and that a small fraction of tokens with a large covariance drives the entropy
collapse. Per valid token t of the batch (mask m_t = 1), with ℓ_t the current log-prob
(detached) and A_t the advantage::

    c_t = (ℓ_t − ℓ̄)(A_t − Ā)          ℓ̄, Ā: means over the batch's n valid tokens

* Clip-Cov (:class:`ClipCov`): K = max(1, ⌊r·n⌋); the candidates are the valid tokens with
  ω_low ≤ c_t ≤ ω_high that the surrogate has not clipped already (those have no gradient to
  remove); K of them (all of them if fewer) are chosen uniformly at random, and the loss drops
  their policy-gradient term (pg_t = 0; they still count in the aggregation's units).
* KL-Cov (:class:`KLCov`): k = max(1, ⌊κ·n⌋); the k tokens with the largest c_t get an extra
  penalty β·|ℓ_t − ℓ^old_t| on their policy-gradient term.

(:func:`~archer.algorithms.policy_loss.clipped_policy_loss` applies both; see its ``cov`` option.)

Defaults, from the paper's code (github.com/PRIME-RL/Entropy-Mechanism-of-RL,
``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``, now in verl's
``core_algos.py``) and its Qwen2.5-7B recipes (``7b_clip_cov.sh``, ``7b_kl_cov.sh``): Clip-Cov
r = 2·10⁻⁴, ω = [1, 5]; KL-Cov κ = 2·10⁻³, β = 1. (verl's generic actor config defaults to
κ = 2·10⁻⁴, β = 0.1; the recipes use the values above.)

The choice does not depend on how the batch is split. Every token of the batch gets a uniform key
u_t ∈ [0, 1) (float64) from a seeded generator, drawn once for the whole ``[B, T]`` batch. Clip-Cov
chooses the K candidates with the smallest keys (a uniformly random K-subset, as verl's
``randperm``); KL-Cov takes the k tokens first in the order (c_t descending, u_t ascending), so
exact ties in c_t (tokens with the same ℓ and A, e.g. ℓ = 0) are broken at random and exactly k
tokens are chosen. Both are thresholds on (c_t, u_t) that each token compares itself with, so the
same generator seed gives the same choice however the batch is split. Over data-parallel ranks,
``gather`` (concatenation over ranks in rank order, e.g. ``Collectives().cat``) makes n, the
means, K and the thresholds those of the whole mini-batch on all ranks; each rank then draws its
keys from its own seed.

Edge cases: the Clip-Cov band is closed (the paper's ω_low ≤ c ≤ ω_high; verl's code uses strict
inequalities, which differ only at exact ties with a bound). Two keys tie with probability about
n²·2⁻⁵³ (then both tokens may be chosen). No valid token: nothing is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ClipCov", "KLCov", "token_covariance", "select_cov_tokens"]

Gather = Callable[[Tensor], Tensor]
"""Concatenates a 1-D tensor over data-parallel ranks, in rank order."""


@dataclass(frozen=True)
class ClipCov:
    """Clip-Cov settings: drop the PG term of a random fraction of the tokens whose covariance lies in a band."""

    ratio: float = 2e-4
    """r: the fraction of the batch's valid tokens whose PG term is dropped (at least one token)."""
    low: float = 1.0
    """ω_low: candidates have c_t ≥ ω_low."""
    high: float = 5.0
    """ω_high: candidates have c_t ≤ ω_high."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0 or self.low > self.high:
            raise ValueError(f"ClipCov needs 0 < ratio <= 1 and low <= high, got {self}")


@dataclass(frozen=True)
class KLCov:
    """KL-Cov settings: penalise |ℓ − ℓ^old| on the tokens with the largest covariance."""

    ratio: float = 2e-3
    """κ: the fraction of the batch's valid tokens that get the penalty (at least one token)."""
    coef: float = 1.0
    """β: the penalty coefficient."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0 or self.coef < 0:
            raise ValueError(f"KLCov needs 0 < ratio <= 1 and coef >= 0, got {self}")


def token_covariance(
    logprob: Tensor, advantages: Tensor, response_mask: Tensor, *, gather: Gather | None = None
) -> tuple[Tensor, Tensor]:
    """``(c, n)``: c_t (module docstring) as float64 ``[B, T]`` (0 at padding) and n, the number of
    valid tokens (0-d float64), both over the batch on all ranks that ``gather`` spans (None: this
    process only). ``logprob`` and ``advantages`` ``[B, T]`` are detached; padding is replaced
    before any arithmetic.
    """
    gather = gather or _this_process
    mask = response_mask.bool()
    logprob = torch.where(mask, logprob.detach().double(), 0.0)
    advantages = torch.where(mask, advantages.detach().double(), 0.0)
    local = torch.stack([logprob.sum(), advantages.sum(), mask.sum().double()])
    total_logprob, total_advantage, n = gather(local).view(-1, 3).sum(dim=0)
    centred = (logprob - total_logprob / n.clamp_min(1)) * (advantages - total_advantage / n.clamp_min(1))
    return torch.where(mask, centred, 0.0), n


def _this_process(values: Tensor) -> Tensor:
    return values


def _count(ratio: float, n: Tensor) -> int:
    """max(1, ⌊ratio · n⌋), as verl (0 when there is no valid token)."""
    valid = int(n)
    return max(1, int(ratio * valid)) if valid else 0


def select_cov_tokens(
    setting: ClipCov | KLCov,
    logprob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    excluded: Tensor | None = None,
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
) -> Tensor:
    """The tokens Clip-Cov or KL-Cov acts on (module docstring), bool ``[B, T]``, False at padding.

    Args:
        setting: :class:`ClipCov` or :class:`KLCov`.
        logprob: current log-probs ``[B, T]`` (detached here).
        advantages: ``[B, T]``.
        response_mask: ``[B, T]`` bool or 0/1.
        excluded: Clip-Cov only: tokens that may not be chosen (those the surrogate already clipped).
        generator: draws the keys (None: torch's global generator, not reproducible).
        gather: concatenation over ranks (None: this process only).
    """
    gather = gather or _this_process
    mask = response_mask.bool()
    covariance, n = token_covariance(logprob, advantages, mask, gather=gather)
    count = _count(setting.ratio, n)
    if count == 0:
        return torch.zeros_like(mask)
    device = generator.device if generator is not None else mask.device
    keys = torch.rand(mask.shape, generator=generator, dtype=torch.float64, device=device).to(mask.device)
    if isinstance(setting, KLCov):
        return _first(covariance, keys, mask, count, gather)
    candidates = mask & (covariance >= setting.low) & (covariance <= setting.high)
    if excluded is not None:
        candidates = candidates & ~excluded.bool()
    return _first(torch.zeros_like(covariance), keys, candidates, count, gather)


def _first(scores: Tensor, keys: Tensor, eligible: Tensor, count: int, gather: Gather) -> Tensor:
    """The ``count`` eligible tokens first in the order (score descending, key ascending) over all
    ranks (all of them if fewer), as the threshold pair each token compares itself with; bool ``[B, T]``."""
    pooled_scores, pooled_keys = gather(scores[eligible]), gather(keys[eligible])
    if pooled_scores.numel() <= count:
        return eligible
    by_key = pooled_keys.argsort()
    last = by_key[pooled_scores[by_key].argsort(descending=True, stable=True)[count - 1]]
    score, key = pooled_scores[last], pooled_keys[last]
    return eligible & ((scores > score) | ((scores == score) & (keys <= key)))
