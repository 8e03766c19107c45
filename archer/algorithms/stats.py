"""Loss statistics kept as a numerator and a denominator, so that parts add up exactly.

A statistic over tokens (a clip fraction, a mean entropy, an aggregated loss) is
``Ratio(num, den)`` with ``value = num / den``. Adding the ratios of micro-batches and ranks
(numerators and denominators separately) and dividing once gives the statistic of the whole batch,
weighted by its units (tokens or responses), and a part with nothing to measure (a micro-batch of
dropped groups: 0 / 0) adds nothing instead of turning the total into NaN. Both parts are detached
float64 0-d tensors: no host synchronisation happens until the caller reads the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Ratio", "masked_ratio"]


@dataclass(frozen=True)
class Ratio:
    """``num / den`` kept apart; ``float(ratio)`` is NaN when ``den`` is 0 (nothing measured)."""

    num: Tensor
    """Sum of the measured quantity (0-d float64, detached)."""
    den: Tensor
    """Number of units it was summed over (0-d float64, detached)."""

    @classmethod
    def of(cls, num: Tensor | float, den: Tensor | float) -> Ratio:
        num = torch.as_tensor(num).detach().to(torch.float64)
        return cls(num, torch.as_tensor(den, device=num.device).detach().to(torch.float64))

    def __add__(self, other: Ratio) -> Ratio:
        return Ratio(self.num + other.num, self.den + other.den)

    def __float__(self) -> float:
        den = float(self.den)
        return float(self.num) / den if den else float("nan")


def masked_ratio(values: Tensor, mask: Tensor) -> Ratio:
    """Token mean of ``values [B, T]`` over the bool ``mask [B, T]`` as ``Ratio(Σ values·m, Σ m)``."""
    values = values.detach().to(torch.float64)
    return Ratio.of(torch.where(mask, values, 0.0).sum(), mask.sum())
