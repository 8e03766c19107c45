"""Group-relative advantage estimators over contiguous groups of ``group_size`` samples.

Rewards ``R`` ``[N]`` hold ``N / G`` groups of ``G = group_size`` responses to the same prompt,
stored contiguously: group g is ``R[g*G : (g+1)*G]``. With mean_g and the unbiased (n−1) std_g::

    GRPO     A_i = (R_i − mean_g) / (std_g + ε)       (Shao et al. 2024; ε = 1e-6)
    Dr.GRPO  A_i =  R_i − mean_g                      (Liu et al. 2025: no std division)
    RLOO     A_i =  R_i − mean_{j≠i} R_j = G/(G−1) · (R_i − mean_g)   (Ahmadian et al. 2024)
    REINFORCE++-baseline                              (Hu et al. 2025, arXiv 2501.03262)
             A_i = (R_i − mean_g) / (std_batch + ε),  std_batch = unbiased std of {R_j − mean_g(j)}
                                                      over the whole batch, not the group

A group of one response, or a group whose rewards are all equal, gets A = 0 exactly (never NaN):
it carries no relative signal. The result is ``[N]``; broadcast it over a response's tokens.

REINFORCE++-baseline's batch is every ``valid`` response of the call (those that dynamic sampling
or the staleness bound dropped are not), groups with A = 0 included (as verl,
which whitens over the batch's tokens instead: a token-weighted std, and it re-centres; the mean
of group-centred rewards over responses is 0 already). Over data-parallel ranks, pass
``sum_over_ranks`` (e.g. ``Collectives().sum``): the std is then over the responses of all ranks,
from the summed count, Σx and Σx² (float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdvantageEstimator", "grpo_advantages", "rloo_advantages", "reinforce_pp_baseline_advantages", "compute_advantages",
]

AdvantageEstimator = Literal["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    return rewards.view(-1, group_size)


def _zero_where_uninformative(advantages: Tensor, groups: Tensor) -> Tensor:
    """A = 0 exactly for groups whose rewards are all equal (float means can leave ±1e-17 residues)."""
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def grpo_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6, normalize_std: bool = True) -> Tensor:
    """GRPO (``normalize_std=True``) or Dr.GRPO (``False``) advantages ``[N]``; formulas in the module docstring."""
    groups = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=1, keepdim=True, unbiased=True) + eps)
    return _zero_where_uninformative(centred, groups).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO leave-one-out advantages ``[N]``: ``R_i − mean of the other G−1 rewards of its group``."""
    groups = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _zero_where_uninformative(groups - others_mean, groups).reshape(-1)


def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """REINFORCE++-baseline advantages ``[N]``: group-centred rewards over the batch's std (module docstring).

    ``sum_over_ranks``: sums a tensor over data-parallel ranks, so that the std is over the whole
    batch on all ranks (every rank must call); None: over these rewards. ``valid`` ``[N]`` bool: the
    responses that will be trained on (groups dynamic sampling dropped are not): only they enter the
    std, as if the dropped ones had been filtered out first. A batch of ≤ 1 response has std 0.
    """
    centred = grpo_advantages(rewards.double(), group_size, normalize_std=False)  # R_i − mean_g, exact 0 if uninformative
    weight = torch.ones_like(centred) if valid is None else valid.to(centred)
    moments = torch.stack([weight.sum(), (weight * centred).sum(), (weight * centred.square()).sum()])
    if sum_over_ranks is not None:
        moments = sum_over_ranks(moments)
    count, total, total_square = moments
    variance = (total_square - total * total / count.clamp_min(1)) / (count - 1).clamp_min(1)
    return (centred / (variance.clamp_min(0).sqrt() + eps)).to(rewards.dtype)


def compute_advantages(
    rewards: Tensor,
    group_size: int,
    estimator: AdvantageEstimator,
    *,
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Dispatch by name: ``"grpo"``, ``"drgrpo"`` (GRPO without std), ``"rloo"`` or
    ``"reinforce_pp_baseline"`` (which uses ``sum_over_ranks`` and ``valid``); returns ``[N]``."""
    if estimator == "grpo":
        return grpo_advantages(rewards, group_size)
    if estimator == "drgrpo":
        return grpo_advantages(rewards, group_size, normalize_std=False)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size)
    if estimator == "reinforce_pp_baseline":
        return reinforce_pp_baseline_advantages(rewards, group_size, sum_over_ranks=sum_over_ranks, valid=valid)
    raise ValueError(
        f"unknown advantage estimator {estimator!r}; expected 'grpo', 'drgrpo', 'rloo' or 'reinforce_pp_baseline'"
    )
