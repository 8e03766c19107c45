"""GSPO: a hand-computed batch, the sequence-level objective it must equal."""

import math

import pytest
import torch

from archer.algorithms import gspo_loss

LN = math.log


def test_hand_computed_sequence_ratios_and_gradients():
    # ℓ_old = 0, band (0.2, 0.2); 4 responses, the last one fully padded (not counted: |S| = 3).
    #   row 0: δ = [ln 2, ln 0.5], A = +1 → s = exp(0) = 1 (in band): pg = −1 per token, row mean −1,
    #          ∂/∂ℓ_t = (1/3)·(−A·s/2) = −1/6.
    #   row 1: δ = [ln 2.25, 0],   A = +1 → s = exp(ln 2.25 / 2) = 1.5 > 1.2: pg = max(−1.5, −1.2) = −1.2, no gradient.
    #   row 2: δ = [ln 2.25, 0],   A = −1 → s = 1.5: pg = max(1.5, 1.2) = 1.5 (unclipped), ∂/∂ℓ_t = (1/3)·(1.5/2) = 0.25.
    # loss = (−1 − 1.2 + 1.5)/3 = −0.7/3.
    logprob = torch.tensor([[LN(2), LN(0.5), 9.0], [LN(2.25), 0.0, 9.0], [LN(2.25), 0.0, 9.0], [9.0, 9.0, 9.0]],
                           dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, 1.0, -1.0, 5.0], dtype=torch.float64)
    loss, stats = gspo_loss(logprob, torch.zeros(4, 3, dtype=torch.float64), advantages, mask, clip=(0.2, 0.2))
    torch.testing.assert_close(loss, torch.tensor(-0.7 / 3, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logprob)
    expected = torch.tensor([[-1 / 6, -1 / 6, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 6)  # row 1's two tokens
    assert float(stats["ratio_mean"]) == pytest.approx((1 + 1 + 4 * 1.5) / 6)  # token mean of s_i
    assert float(stats["pg_loss"]) == pytest.approx(-0.7 / 3)
    assert float(stats["kl"]) != float(stats["kl"])  # no reference: 0 / 0 → NaN


@pytest.mark.parametrize("clip", [(0.05, 0.08), (3e-4, 4e-4)])
def test_one_advantage_per_response_is_the_sequence_level_objective(clip):
    generator = torch.Generator().manual_seed(0)
    shape = (6, 8)
    logprob = (-torch.rand(shape, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    old = logprob.detach() + 0.05 * torch.randn(shape, generator=generator, dtype=torch.float64)
    advantages = torch.randn(shape[0], generator=generator, dtype=torch.float64)
    mask = torch.rand(shape, generator=generator) < 0.8
    mask[:, 0] = True
    loss, _ = gspo_loss(logprob, old, advantages, mask, clip=clip)
    # −mean_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean of ℓ − ℓ_old over response i), all by plain autograd.
    s = torch.exp((torch.where(mask, logprob - old, 0.0)).sum(-1) / mask.sum(-1))
    sequence = -torch.minimum(s * advantages, s.clamp(1 - clip[0], 1 + clip[1]) * advantages).mean()
    torch.testing.assert_close(loss, sequence)
    torch.testing.assert_close(torch.autograd.grad(loss, logprob)[0], torch.autograd.grad(sequence, logprob)[0])



def test_the_sequence_ratio_is_the_mean_of_unclamped_token_log_ratios():
    # δ = [30, −12]: s = exp(mean δ) = exp(9) (a per-token clamp at ±20 would give exp((20 − 12)/2) = e⁴).
    # A = −1 and s far above 1 + ε⁺: pg_t = max(s, clip(s)) = s on both tokens; seq-mean-token-mean = s.
    logprob = torch.tensor([[30.0, -12.0]], dtype=torch.float64)
    loss, _ = gspo_loss(logprob, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                        torch.ones(1, 2))
    torch.testing.assert_close(loss, torch.tensor(math.exp(9.0), dtype=torch.float64))
