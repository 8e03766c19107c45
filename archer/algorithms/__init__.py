"""Archer's algorithm core: pure functions over tensors (no Lightning, no I/O).

One concept per module: :mod:`.logprobs` (chunked log-prob + entropy), :mod:`.token_typing`
(entropy quantile typing), :mod:`.advantages`, :mod:`.kl`, :mod:`.aggregation`,
:mod:`.policy_loss` (vanilla / dual-token / 80-20 in one surrogate), :mod:`.shaping`,
:mod:`.stats` (statistics as numerator / denominator pairs).
See ``docs/algorithms.md`` for the map to the papers' equations.
"""

from archer.algorithms.advantages import compute_advantages, grpo_advantages, rloo_advantages
from archer.algorithms.aggregation import AGGREGATION_MODES, AggregationMode, agg_loss, agg_parts, agg_units
from archer.algorithms.kl import KLEstimator, kl_penalty
from archer.algorithms.logprobs import logprobs_and_entropy_from_logits, token_logprobs_and_entropy
from archer.algorithms.policy_loss import (
    STAT_KEYS,
    clipped_policy_loss,
    clipped_surrogate,
    dual_token_loss,
    high_entropy_mask_loss,
)
from archer.algorithms.stats import Ratio, masked_ratio
from archer.algorithms.shaping import overlong_penalty, position_advantage_shaping, ppl_advantage_shaping
from archer.algorithms.token_typing import classify_tokens, entropy_threshold

__all__ = [
    "AGGREGATION_MODES",
    "AggregationMode",
    "Ratio",
    "KLEstimator",
    "STAT_KEYS",
    "agg_loss",
    "agg_parts",
    "agg_units",
    "classify_tokens",
    "clipped_policy_loss",
    "clipped_surrogate",
    "compute_advantages",
    "dual_token_loss",
    "entropy_threshold",
    "grpo_advantages",
    "high_entropy_mask_loss",
    "kl_penalty",
    "logprobs_and_entropy_from_logits",
    "masked_ratio",
    "overlong_penalty",
    "position_advantage_shaping",
    "ppl_advantage_shaping",
    "rloo_advantages",
    "token_logprobs_and_entropy",
]
