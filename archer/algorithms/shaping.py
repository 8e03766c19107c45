"""Reward and advantage shaping: DAPO's overlong penalty and the two shapings of arXiv 2508.02260.

Overlong penalty (DAPO, "soft overlong punishment"), response length L, maximum length L_max,
buffer L_buf, penalty p::

    R_len(L) = 0                                  if L ≤ L_max − L_buf
             = −p · (L − (L_max − L_buf)) / L_buf if L_max − L_buf < L ≤ L_max
             = −p                                 if L > L_max

Perplexity shaping (2508.02260), applied to advantages after they are computed. With the
response's log-perplexity logPPL_i = −(1/n_i) Σ_t ℓ_{i,t} (detached; n_i valid tokens) and
w_i its z-score within the response's group (``scope="group"``) or over the batch
(``scope="batch"``), unbiased std + 1e-6, 0 for a group of one or all-equal values::

    Ã_{i,t} = A_{i,t} · (1 − α · w_i)

so, for α > 0, responses the model finds likelier (low perplexity, w_i < 0) get larger |A|.

Position shaping (2508.02260): with t' = 1..n_i the index of the valid token in its response::

    b_{i,t} = β · (t' / n_i)^κ            (κ = ``power``; linear by default)
    Ã_{i,t} = A_{i,t} + sign(A_{i,t}) · b_{i,t}

so later tokens (where the answer is decided) get a larger |A|; A = 0 stays 0. The paper gives no
public code: the forms above follow its description, and α, β, κ are configurable. Padding
positions are returned unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from archer.algorithms.advantages import grpo_advantages

__all__ = ["overlong_penalty", "ppl_advantage_shaping", "position_advantage_shaping"]


def overlong_penalty(response_lengths: Tensor, *, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong penalty ``[N]`` (float32, ≤ 0) for response lengths ``[N]``; formula in the module docstring."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must satisfy 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    excess = (response_lengths.float() - (max_len - buffer)).clamp(0.0, float(buffer))
    return -penalty * excess / buffer


def _token_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == response_mask.shape[0]:
        return advantages.unsqueeze(-1).expand_as(response_mask)
    if advantages.shape != response_mask.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(response_mask.shape)}, got {tuple(advantages.shape)}")
    return advantages


def ppl_advantage_shaping(
    advantages: Tensor,
    logprob: Tensor,
    response_mask: Tensor,
    group_size: int,
    *,
    alpha: float = 0.01,
    scope: Literal["group", "batch"] = "group",
) -> Tensor:
    """Perplexity-weighted advantages ``[B, T]`` (module docstring); ``advantages`` ``[B]`` or ``[B, T]``.

    Groups are contiguous blocks of ``group_size`` rows, as in
    :func:`~archer.algorithms.advantages.grpo_advantages` (whose z-score this reuses). A response
    with no valid token (e.g. a group dynamic sampling dropped) is left out of the batch z-score and
    left unchanged. ``scope="batch"`` z-scores over the rows given (the trainer gives one rank's rows:
    over several ranks it is a per-rank statistic).
    """
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}")
    mask = response_mask.bool()
    token_adv = _token_advantages(advantages, mask)
    valid_logprob = torch.where(mask, logprob.detach().double(), 0.0)
    log_ppl = -valid_logprob.sum(-1) / mask.sum(-1).clamp_min(1)
    if scope == "group":
        weight = grpo_advantages(log_ppl, group_size)
    else:
        valid = mask.any(-1)
        weight = torch.zeros_like(log_ppl)
        weight[valid] = grpo_advantages(log_ppl[valid], max(1, int(valid.sum())))
    shaped = token_adv * (1.0 - alpha * weight.to(token_adv.dtype)).unsqueeze(-1)
    return torch.where(mask, shaped, token_adv)


def position_advantage_shaping(advantages: Tensor, response_mask: Tensor, *, beta: float = 0.1, power: float = 1.0) -> Tensor:
    """Position-bonus advantages ``[B, T]``: ``A + sign(A) · β · (t'/n_i)^κ`` on valid tokens (module docstring)."""
    if beta < 0 or power <= 0:
        raise ValueError(f"position shaping needs beta >= 0 and power > 0, got beta={beta}, power={power}")
    mask = response_mask.bool()
    token_adv = _token_advantages(advantages, mask)
    position = mask.cumsum(-1).to(token_adv.dtype)  # t' = 1..n_i on valid tokens
    relative = position / mask.sum(-1, keepdim=True).clamp_min(1).to(token_adv.dtype)
    shaped = token_adv + torch.sign(token_adv) * beta * relative.pow(power)
    return torch.where(mask, shaped, token_adv)
