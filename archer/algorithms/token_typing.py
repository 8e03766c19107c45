"""Entropy-based token typing: reasoning (high-entropy) vs knowledge (low-entropy) tokens.

Per response i with valid tokens {t : m_t = 1} and entropies H_t::

    q_i = quantile_ρ({H_t : m_t = 1})     linear interpolation (torch.quantile), padding excluded
    reasoning_t = m_t ∧ (H_t > q_i)       strict: ties with the threshold are knowledge tokens
    knowledge_t = m_t ∧ ¬reasoning_t

Degenerate cases (they follow from the definition, and tests pin them):
  * 1-token response: q_i = H_t, so the token is a knowledge token.
  * all-equal entropies: q_i equals them, no token is strictly above: all knowledge.
  * empty response (no valid token): q_i = NaN, no token typed (padding is never typed).
  * ρ = 1: q_i = max, no reasoning token; ρ = 0: q_i = min, every token strictly above the
    response's minimum entropy is a reasoning token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["entropy_threshold", "classify_tokens"]


def entropy_threshold(
    entropy: Tensor, response_mask: Tensor, rho: float, *, level: Literal["response", "batch"] = "response"
) -> Tensor:
    """ρ-quantile of the valid tokens' entropies: ``[B, 1]`` per response, or ``[1, 1]`` over the batch.

    ``entropy`` ``[B, T]`` (detached here), ``response_mask`` ``[B, T]`` (bool or 0/1). Padding is set
    to NaN and excluded by ``torch.nanquantile``; a response (or batch) with no valid token gets NaN.
    The batch level sorts the valid entropies instead (same interpolation), because
    ``torch.quantile`` accepts at most 2**24 elements and a mini-batch of long responses has more.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    if entropy.shape != response_mask.shape or entropy.dim() != 2:
        raise ValueError(f"entropy {tuple(entropy.shape)} and response_mask {tuple(response_mask.shape)} must both be [B, T]")
    if level not in ("response", "batch"):
        raise ValueError(f"level must be 'response' or 'batch', got {level!r}")
    # float64 for the interpolation so the threshold of float32 entropies is exact to compare with.
    if level == "batch":
        return _linear_quantile(entropy.detach().double()[response_mask.bool()], rho).reshape(1, 1)
    values = entropy.detach().double().masked_fill(~response_mask.bool(), float("nan"))
    return torch.nanquantile(values, rho, dim=-1, keepdim=True)


def _linear_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation between the sorted neighbours of position
    q·(n − 1)) for 1-D ``values`` of any length; NaN when empty."""
    if values.numel() == 0:
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    ordered = values.sort().values
    position = q * (values.numel() - 1)
    low = int(position)
    high = min(low + 1, values.numel() - 1)
    return torch.lerp(ordered[low], ordered[high], position - low)


def classify_tokens(entropy: Tensor, response_mask: Tensor, rho: float) -> Tensor:
    """Reasoning-token mask ``bool [B, T]``: ``H_t > q_i`` on valid tokens (module docstring for q_i).

    ``entropy`` ``[B, T]`` float (detached; never a source of gradients), ``response_mask``
    ``[B, T]`` bool or 0/1, ``rho`` ∈ [0, 1] (Archer: 0.8, about 20% reasoning tokens per response).
    Knowledge tokens are ``response_mask & ~reasoning``.
    """
    threshold = entropy_threshold(entropy, response_mask, rho, level="response")
    # NaN threshold (empty response) compares False: no typed token.
    return (entropy.detach().double() > threshold) & response_mask.bool()
