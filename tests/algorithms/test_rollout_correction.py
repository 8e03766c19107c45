"""Rollout-correction weights and their statistics on hand-computed cases; the weights as pg_weight."""

import math

import pytest
import torch

from archer.algorithms import clipped_policy_loss, rollout_correction_weights, rollout_mismatch_stats

LN = math.log
# Engine log-probs 0, so δ = ℓ^old. Row 0: δ = [ln 3, ln 0.25, ln 1.5]; row 1: [ln 0.5, ln 0.5, padding].
OLD = torch.tensor([[LN(3), LN(0.25), LN(1.5)], [LN(0.5), LN(0.5), 7.0]], dtype=torch.float64)
ROLLOUT = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("nan")]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "level, mode, lower, expected",
    [
        # token ρ = [3, 0.25, 1.5 | 0.5, 0.5]; truncate at 2 → [2, 0.25, 1.5 | 0.5, 0.5].
        ("token", "truncate", None, [[2.0, 0.25, 1.5], [0.5, 0.5, 0.0]]),
        # mask [0.4, 2]: 3 and 0.25 fall outside; inside, w = ρ.
        ("token", "mask", 0.4, [[0.0, 0.0, 1.5], [0.5, 0.5, 0.0]]),
        # sequence ρ = [3·0.25·1.5, 0.5·0.5] = [1.125, 0.25], on every token of the response.
        ("sequence", "truncate", None, [[1.125] * 3, [0.25, 0.25, 0.0]]),
        ("sequence", "mask", None, [[1.125] * 3, [0.0, 0.0, 0.0]]),  # lower = 1/2: 0.25 is masked, 1.125 kept
        # geometric ρ = [1.125^(1/3), 0.25^(1/2)] = [1.0400419, 0.5]; mask [0.6, 2] drops row 1.
        ("geometric", "truncate", None, [[1.125 ** (1 / 3)] * 3, [0.5, 0.5, 0.0]]),
        ("geometric", "mask", 0.6, [[1.125 ** (1 / 3)] * 3, [0.0, 0.0, 0.0]]),
    ],
)
def test_weights_by_hand(level, mode, lower, expected):
    old = OLD.clone().requires_grad_()
    weights = rollout_correction_weights(old, ROLLOUT, MASK, level=level, mode=mode, upper=2.0, lower=lower)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    assert not weights.requires_grad


def test_statistics_by_hand():
    # k3 = e^δ − δ − 1 per valid token: 3 − ln 3 − 1 = 0.9013877; 0.25 + ln 4 − 1 = 0.6362944;
    # 1.5 − ln 1.5 − 1 = 0.0945349; 0.5 + ln 2 − 1 = 0.1931472 (twice). Token mean = 2.0185114/5 = 0.4037023.
    kl = (3 - LN(3) - 1 + 0.25 + LN(4) - 1 + 1.5 - LN(1.5) - 1 + 2 * (0.5 + LN(2) - 1)) / 5
    weights = rollout_correction_weights(OLD, ROLLOUT, MASK)
    stats = rollout_mismatch_stats(OLD, ROLLOUT, MASK, weights)
    assert float(stats["mismatch_kl"]) == pytest.approx(kl)
    assert float(stats["is_weight_mean"]) == pytest.approx((2 + 0.25 + 1.5 + 0.5 + 0.5) / 5)  # over tokens
    assert float(stats["is_affected_fraction"]) == pytest.approx(1 / 5)  # only ρ = 3 > 2 was truncated
    # Sequence level, mask [0.5, 2]: ρ = [1.125, 0.25] → w = [1.125, 0]; counted over the 2 responses:
    # mean weight (1.125 + 0)/2 = 0.5625, one response of two masked.
    weights = rollout_correction_weights(OLD, ROLLOUT, MASK, level="sequence", mode="mask")
    stats = rollout_mismatch_stats(OLD, ROLLOUT, MASK, weights, level="sequence", mode="mask")
    assert float(stats["is_weight_mean"]) == pytest.approx(0.5625) and float(stats["is_affected_fraction"]) == 0.5
    assert float(stats["mismatch_kl"]) == pytest.approx(kl)  # per token whatever the level


@pytest.mark.parametrize(
    "level, old",
    [
        ("token", [[0.5, 0.5]]),  # ρ_t = e^0.5 on each token
        ("sequence", [[0.25, 0.25]]),  # Σδ = 0.25 + 0.25 = 0.5
        ("geometric", [[0.75, 0.25]]),  # mean δ = (0.75 + 0.25)/2 = 0.5
    ],
)
def test_the_mask_keeps_the_importance_weight_inside_the_band(level, old):
    # Engine log-probs 0, band [0.5, 2]: ρ = e^0.5 = 1.6487213 lies inside, so w = ρ (MIS / IcePop, TRL
    # token/sequence_mask, verl IS × rejection mask), not 1 (the rejection mask alone).
    old = torch.tensor(old, dtype=torch.float64)
    weights = rollout_correction_weights(old, torch.zeros_like(old), torch.ones(1, 2), level=level, mode="mask", upper=2.0)
    torch.testing.assert_close(weights, torch.full((1, 2), 1.6487212707001282, dtype=torch.float64))
    stats = rollout_mismatch_stats(old, torch.zeros_like(old), torch.ones(1, 2), weights, level=level, mode="mask")
    assert float(stats["is_weight_mean"]) == pytest.approx(1.6487212707001282) and float(stats["is_affected_fraction"]) == 0


def test_an_empty_batch_measures_nothing_and_bad_settings_are_rejected():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    weights = rollout_correction_weights(OLD, ROLLOUT, empty, level="geometric")
    assert torch.equal(weights, torch.zeros(2, 3, dtype=torch.float64))
    stats = rollout_mismatch_stats(OLD, ROLLOUT, empty, weights, level="geometric")
    assert all(float(value.den) == 0 for value in stats.values())
    with pytest.raises(ValueError, match="level"):
        rollout_correction_weights(OLD, ROLLOUT, MASK, level="tokens")
    with pytest.raises(ValueError, match="lower"):
        rollout_correction_weights(OLD, ROLLOUT, MASK, mode="mask", upper=2.0, lower=3.0)


def test_weights_multiply_the_pg_term_but_not_the_kl_nor_the_denominator():
    # A = 1, ℓ_old = 0, r = [1.1, 1.5, 0.5], band (0.2, 0.2): pg = [−1.1, −1.2 (clipped), −0.5].
    # w = [0.5, 2, 0]: PG = (−0.55 − 2.4 + 0)/3 (still /3); ∂/∂ℓ = −A·r·w/3 = [−0.55/3, 0, 0].
    # KL (k3 to ℓ_ref = 0, β = 0.1) is the same with and without w.
    logprob = torch.tensor([[LN(1.1), LN(1.5), LN(0.5)]], dtype=torch.float64, requires_grad=True)
    args = (logprob, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3))
    weight = torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64)
    loss, stats = clipped_policy_loss(*args, pg_weight=weight)
    torch.testing.assert_close(loss, torch.tensor(-2.95 / 3, dtype=torch.float64))
    torch.testing.assert_close(torch.autograd.grad(loss, logprob)[0], torch.tensor([[-0.55 / 3, 0.0, 0.0]], dtype=torch.float64))
    assert float(stats["pg_loss"]) == pytest.approx(-2.95 / 3)
    kl = {"ref_logprob": torch.zeros(1, 3, dtype=torch.float64), "kl_coef": 0.1}
    weighted_kl = clipped_policy_loss(*args, pg_weight=weight, **kl)[0] - loss
    unweighted_kl = clipped_policy_loss(*args, **kl)[0] - clipped_policy_loss(*args)[0]
    torch.testing.assert_close(weighted_kl, unweighted_kl)
