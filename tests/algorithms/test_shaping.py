"""Overlong penalty and the two advantage shapings of arXiv 2508.02260, hand-computed."""

import math

import pytest
import torch

from archer.algorithms import overlong_penalty, position_advantage_shaping, ppl_advantage_shaping


def test_overlong_penalty_linear_in_the_buffer():
    # max_len 10, buffer 4 → free up to 6; L = 7 → −(7−6)/4 = −0.25; L = 10 → −1; L = 12 → −1 (capped).
    lengths = torch.tensor([5, 6, 7, 10, 12])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer=4), torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0]))
    torch.testing.assert_close(
        overlong_penalty(lengths, max_len=10, buffer=4, penalty=0.5), torch.tensor([0.0, 0.0, -0.125, -0.5, -0.5])
    )
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=10, buffer=11)


def test_ppl_shaping_favours_low_perplexity_within_the_group():
    # Group of 2: row 0 ℓ = −1 everywhere → logPPL 1; row 1 ℓ = −3 on its 2 valid tokens → logPPL 3.
    # z-scores: mean 2, unbiased std √2 → w = ∓1/(√2 + 1e-6) = ∓0.7071063.
    # α = 0.1, A = 1: Ã_0 = 1 + 0.1·0.7071063 = 1.0707106; Ã_1 = 0.9292894; padding unchanged (A = 1).
    logprob = torch.tensor([[-1.0, -1.0, -1.0], [-3.0, -3.0, 55.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    shaped = ppl_advantage_shaping(torch.tensor([1.0, 1.0]), logprob, mask, 2, alpha=0.1)
    w = 1 / (math.sqrt(2) + 1e-6)
    torch.testing.assert_close(shaped, torch.tensor([[1 + 0.1 * w] * 3, [1 - 0.1 * w, 1 - 0.1 * w, 1.0]]))


def test_ppl_shaping_scope_group_vs_batch():
    # Rows' logPPL = [1, 3, 1, 3]. Group scope (size 2): w = [−.707, .707, −.707, .707].
    # Batch scope: mean 2, unbiased std = √(4/3) = 1.1547005 → w = ∓0.8660254.
    logprob = torch.tensor([[-1.0], [-3.0], [-1.0], [-3.0]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    advantages = torch.ones(4)
    group = ppl_advantage_shaping(advantages, logprob, mask, 2, alpha=1.0, scope="group")
    batch = ppl_advantage_shaping(advantages, logprob, mask, 2, alpha=1.0, scope="batch")
    torch.testing.assert_close(group[:, 0], torch.tensor([1.7071063, 0.2928937, 1.7071063, 0.2928937]))
    torch.testing.assert_close(batch[:, 0], torch.tensor([1.8660246, 0.1339754, 1.8660246, 0.1339754]))


def test_position_shaping_grows_with_relative_position_and_keeps_sign():
    # 4 valid tokens, β = 0.4, κ = 1: b = 0.4·[1/4, 2/4, 3/4, 4/4] = [0.1, 0.2, 0.3, 0.4].
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 3, dtype=torch.bool)
    shaped = position_advantage_shaping(torch.tensor([2.0, -2.0, 0.0]), mask, beta=0.4)
    expected = torch.tensor([[2.1, 2.2, 2.3, 2.4, 2.0], [-2.1, -2.2, -2.3, -2.4, -2.0], [0.0] * 5])
    torch.testing.assert_close(shaped, expected)
    # κ = 2: b = 0.4·[1/16, 4/16, 9/16, 1] = [0.025, 0.1, 0.225, 0.4].
    squared = position_advantage_shaping(torch.tensor([1.0]), mask[:1], beta=0.4, power=2.0)
    torch.testing.assert_close(squared, torch.tensor([[1.025, 1.1, 1.225, 1.4, 1.0]]))
