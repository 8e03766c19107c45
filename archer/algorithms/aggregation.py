"""Reducing a per-token loss ``L [B, T]`` under a mask ``m [B, T]`` to a scalar.

With s_i = Σ_t L_{i,t} m_{i,t}, n_i = Σ_t m_{i,t} and S = {i : n_i ≥ 1} (responses with at least
one valid token)::

    token-mean               Σ_i s_i / Σ_i n_i                      (DAPO; every token weighs the same)
    seq-mean-token-mean      (1/|S|) Σ_{i∈S} s_i / n_i              (GRPO; every response weighs the same)
    seq-mean-token-sum       (1/|S|) Σ_{i∈S} s_i
    seq-mean-token-sum-norm  (1/|S|) Σ_{i∈S} s_i / norm_len         (Dr.GRPO; norm_len defaults to T)

An empty mask gives 0 (not NaN). Responses with no valid token are left out of the seq-* means
(so a fully padded row, e.g. one added to balance ranks, dilutes nothing).

Gradient accumulation and data parallelism: every mode is a sum over units divided by the number
of units ``U`` (tokens for token-mean, responses in S for seq-*): :func:`agg_parts` returns both,
:func:`agg_units` returns U. Dividing each micro-batch's sum by ``U_global`` (the count over the
whole mini-batch on all ranks: ``agg_loss(..., units=U_global)``) and adding the parts gives the
mini-batch aggregate exactly, for every mode (multiply by the world size when the data-parallel
all-reduce averages gradients over ranks).

Note: seq-mean-token-sum-norm here averages over responses, as Dr.GRPO's formula
(1/G Σ_i 1/MAX_LEN Σ_t); verl's implementation of it sums over responses instead (a constant
factor B away).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["AggregationMode", "AGGREGATION_MODES", "agg_loss", "agg_parts", "agg_units"]

AggregationMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATION_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check(values: Tensor, mask: Tensor, mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATION_MODES}")
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")


def agg_units(mask: Tensor, mode: AggregationMode) -> Tensor:
    """Number of units the mode averages over (0-d int64 tensor, no host sync): valid tokens (token-mean)
    or responses with ≥1 valid token (seq-*)."""
    _check(mask, mask, mode)
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum()
    return mask.any(dim=-1).sum()


def agg_parts(values: Tensor, mask: Tensor, mode: AggregationMode, *, norm_len: int | None = None) -> tuple[Tensor, Tensor]:
    """``(numerator, units)`` of the mode: the aggregate is ``numerator / units`` (formulas in the module docstring).

    numerator = Σ_t L m (token-mean), Σ_{i∈S} s_i / n_i, Σ_{i∈S} s_i or Σ_{i∈S} s_i / norm_len (seq-*);
    units = :func:`agg_units`. Both are sums over tokens or responses, so the parts of a batch split
    into micro-batches and ranks add up to the whole batch's numerator and units.
    """
    _check(values, mask, mode)
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    token_sums = masked.sum(dim=-1)  # s_i, [B]
    if mode == "token-mean":
        return token_sums.sum(), mask.sum()
    tokens_per_seq = mask.sum(dim=-1)  # n_i, [B]
    if mode == "seq-mean-token-sum":
        per_seq = token_sums
    elif mode == "seq-mean-token-mean":
        per_seq = token_sums / tokens_per_seq.clamp_min(1)
    else:
        length = values.shape[-1] if norm_len is None else norm_len
        if length <= 0:
            raise ValueError(f"norm_len must be > 0, got {norm_len}")
        per_seq = token_sums / length
    # Rows with no valid token have per_seq = 0 and are not counted.
    return per_seq.sum(), (tokens_per_seq > 0).sum()


def agg_loss(
    values: Tensor, mask: Tensor, mode: AggregationMode, *, norm_len: int | None = None, units: Tensor | float | None = None
) -> Tensor:
    """Scalar aggregate of ``values [B, T]`` over ``mask [B, T]`` (bool or 0/1); formulas in the module docstring.

    Masked positions are selected out with ``torch.where`` (not multiplied), so NaN/inf at padding
    cannot leak into the result or its gradient. ``norm_len`` is used by seq-mean-token-sum-norm only.
    ``units``: divide by this count instead of the local one — pass the unit count of the whole
    mini-batch (all micro-batches, all ranks) and the results of its parts add up to the whole
    batch's aggregate. A count of 0 (nothing valid anywhere) gives 0, not NaN.
    """
    numerator, local_units = agg_parts(values, mask, mode, norm_len=norm_len)
    denominator = local_units if units is None else torch.as_tensor(units, device=numerator.device)
    return numerator / denominator.clamp_min(1).to(numerator.dtype)
