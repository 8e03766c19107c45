"""Archer's algorithm core: pure functions over tensors (no Lightning, no I/O).

One concept per module: :mod:`.logprobs` (chunked log-prob + entropy), :mod:`.token_typing`
(entropy quantile typing), :mod:`.advantages`, :mod:`.kl` (KL as a loss term or in the reward),
:mod:`.aggregation`, :mod:`.policy_loss` (vanilla / dual-token / 80-20 in one surrogate, the
entropy bonus and the per-token PG weight), :mod:`.covariance` (Clip-Cov / KL-Cov token selection),
:mod:`.gspo`, :mod:`.cispo`, :mod:`.rollout_correction` (engine–trainer mismatch weights),
:mod:`.shaping`, :mod:`.stats` (statistics as numerator / denominator pairs).
See ``docs/algorithms.md`` for the map to the papers' equations.
"""

from archer.algorithms.advantages import (
    AdvantageEstimator,
    compute_advantages,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from archer.algorithms.aggregation import AGGREGATION_MODES, AggregationMode, agg_loss, agg_parts, agg_units
from archer.algorithms.cispo import cispo_loss
from archer.algorithms.covariance import ClipCov, KLCov, select_cov_tokens, token_covariance
from archer.algorithms.gspo import gspo_loss
from archer.algorithms.kl import KLEstimator, kl_in_reward, kl_penalty
from archer.algorithms.logprobs import logprobs_and_entropy_from_logits, token_logprobs_and_entropy
from archer.algorithms.policy_loss import (
    STAT_KEYS,
    Surrogate,
    clipped_policy_loss,
    clipped_surrogate,
    dual_token_loss,
    entropy_bonus,
    high_entropy_mask_loss,
    surrogate_loss,
)
from archer.algorithms.rollout_correction import (
    CorrectionLevel,
    CorrectionMode,
    rollout_correction_weights,
    rollout_mismatch_stats,
)
from archer.algorithms.stats import Ratio, masked_ratio
from archer.algorithms.shaping import overlong_penalty, position_advantage_shaping, ppl_advantage_shaping
from archer.algorithms.token_typing import classify_tokens, entropy_threshold

__all__ = [
    "AGGREGATION_MODES",
    "AdvantageEstimator",
    "AggregationMode",
    "ClipCov",
    "CorrectionLevel",
    "CorrectionMode",
    "KLCov",
    "KLEstimator",
    "Ratio",
    "STAT_KEYS",
    "Surrogate",
    "agg_loss",
    "agg_parts",
    "agg_units",
    "cispo_loss",
    "classify_tokens",
    "clipped_policy_loss",
    "clipped_surrogate",
    "compute_advantages",
    "dual_token_loss",
    "entropy_bonus",
    "entropy_threshold",
    "grpo_advantages",
    "gspo_loss",
    "high_entropy_mask_loss",
    "kl_in_reward",
    "kl_penalty",
    "logprobs_and_entropy_from_logits",
    "masked_ratio",
    "overlong_penalty",
    "position_advantage_shaping",
    "ppl_advantage_shaping",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "rollout_correction_weights",
    "rollout_mismatch_stats",
    "select_cov_tokens",
    "surrogate_loss",
    "token_covariance",
    "token_logprobs_and_entropy",
]
