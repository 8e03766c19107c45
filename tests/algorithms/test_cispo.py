"""CISPO: the clipped weight is detached and every token keeps its gradient."""

import math

import pytest
import torch

from archer.algorithms import cispo_loss, clipped_policy_loss


def test_hand_computed_every_token_keeps_its_gradient():
    # ℓ_old = 0, ℓ = [ln 1.1, ln 7, ln 0.5] → r = [1.1, 7, 0.5]; A = [1, 1, −1]; band (1, 4) = [0, 5] → r̂ = [1.1, 5, 0.5].
    #   pg = −r̂·A·ℓ: t0 −1.1·ln 1.1 = −0.1048412; t1 −5·ln 7 = −9.7295507; t2 −0.5·(−1)·ln 0.5 = −0.3465736.
    # token-mean = −10.1809655/3 = −3.3936552; ∂/∂ℓ = −r̂·A/3 = [−1.1/3, −5/3, 0.5/3] (t1 is clipped yet keeps its gradient).
    logprob = torch.tensor([[math.log(1.1), math.log(7.0), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, stats = cispo_loss(logprob, torch.zeros(1, 3, dtype=torch.float64), advantages, torch.ones(1, 3), clip=(1.0, 4.0))
    expected = -(1.1 * math.log(1.1) + 5 * math.log(7.0) - 0.5 * math.log(0.5)) / 3
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[-1.1 / 3, -5 / 3, 0.5 / 3]], dtype=torch.float64))
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3) and float(stats["ratio_mean"]) == pytest.approx(8.6 / 3)


def test_gradient_at_the_old_policy_equals_ppo():
    # At ℓ = ℓ_old (first PPO epoch) r = 1, r̂ = 1 and both losses have gradient −A ∇ℓ per token.
    generator = torch.Generator().manual_seed(0)
    logprob = (-torch.rand(3, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(3, generator=generator, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=generator) < 0.8
    cispo, _ = cispo_loss(logprob, logprob.detach(), advantages, mask, clip=(0.2, 0.2), loss_agg="seq-mean-token-mean")
    ppo, _ = clipped_policy_loss(logprob, logprob.detach(), advantages, mask, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(torch.autograd.grad(cispo, logprob)[0], torch.autograd.grad(ppo, logprob)[0])

