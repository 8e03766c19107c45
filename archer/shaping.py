"""Configurable advantage shapings the YAML selects by ``class_path`` (the math is in
:mod:`archer.algorithms.shaping`). The trainer applies one after computing advantages::

    advantages = shaping(advantages, logprob, response_mask, group_size)   # [B, T]
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from archer.algorithms.shaping import position_advantage_shaping, ppl_advantage_shaping

__all__ = ["AdvantageShaping", "PerplexityShaping", "PositionShaping"]


class AdvantageShaping:
    """Base class: ``(advantages [B, T] or [B], logprob [B, T], response_mask [B, T], group_size) → [B, T]``."""

    uses_logprob: bool = True
    """Reads ``logprob`` (π_old, before the update): the step then runs a separate π_old pass."""

    def __call__(self, advantages: Tensor, logprob: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class PerplexityShaping(AdvantageShaping):
    """PPL shaping (arXiv 2508.02260): ``Ã = A · (1 − α · z(logPPL))``, favouring low-perplexity responses."""

    def __init__(self, alpha: float = 0.01, scope: Literal["group", "batch"] = "group") -> None:
        """
        Args:
            alpha: α, strength of the perplexity weighting (our default; the paper has no public code).
            scope: z-score logPPL within each prompt's group or over the whole batch.
        """
        self.alpha = alpha
        self.scope = scope

    def __call__(self, advantages: Tensor, logprob: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
        return ppl_advantage_shaping(advantages, logprob, response_mask, group_size, alpha=self.alpha, scope=self.scope)


class PositionShaping(AdvantageShaping):
    """Position shaping (arXiv 2508.02260): ``Ã_t = A_t + sign(A_t) · β · (t/|o|)^κ``, favouring late tokens."""

    uses_logprob = False

    def __init__(self, beta: float = 0.1, power: float = 1.0) -> None:
        """
        Args:
            beta: β, the bonus at the last token (our default; the paper has no public code).
            power: κ, shape of the bonus along the response (1 = linear).
        """
        self.beta = beta
        self.power = power

    def __call__(self, advantages: Tensor, logprob: Tensor, response_mask: Tensor, group_size: int) -> Tensor:
        return position_advantage_shaping(advantages, response_mask, beta=self.beta, power=self.power)
