"""KL estimators: hand values, verl's clamps, and the gradient through the current log-prob."""

import math

import pytest
import torch

from archer.algorithms import kl_in_reward, kl_penalty


def test_estimators_hand_computed():
    # ℓ = ln 0.5, ℓ_ref = ln 0.25: k1 = ln 2 = 0.6931472; k2 = ½ (ln 2)² = 0.2402265;
    # k3: d = ℓ_ref − ℓ = −ln 2, exp(d) = 0.5 → 0.5 + ln 2 − 1 = 0.1931472.
    logprob = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    torch.testing.assert_close(kl_penalty(logprob, ref, "k1"), torch.tensor([[0.6931472]]))
    torch.testing.assert_close(kl_penalty(logprob, ref, "k2"), torch.tensor([[0.2402265]]))
    k3 = kl_penalty(logprob, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([[0.1931472]]))
    torch.testing.assert_close(kl_penalty(logprob, ref, "low_var_kl"), k3)
    # ∂k3/∂ℓ = 1 − exp(d) = 0.5: the KL is a loss with a gradient, not a detached number.
    (grad,) = torch.autograd.grad(k3.sum(), logprob)
    torch.testing.assert_close(grad, torch.tensor([[0.5]]))


def test_k3_clamps_as_verl():
    # ℓ = 0, ℓ_ref = −50: d clamps to −20 → e^−20 + 20 − 1 ≈ 19 → clamped to 10, zero gradient.
    # ℓ = −50, ℓ_ref = 0: d clamps to 20 → e^20 − 21 ≈ 4.85e8 → 10.
    logprob = torch.tensor([[0.0, -50.0]], requires_grad=True)
    k3 = kl_penalty(logprob, torch.tensor([[-50.0, 0.0]]), "low_var_kl")
    torch.testing.assert_close(k3, torch.tensor([[10.0, 10.0]]))
    (grad,) = torch.autograd.grad(k3.sum(), logprob)
    assert torch.equal(grad, torch.zeros(1, 2))


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 1), "k1")


def test_kl_in_reward_subtracts_the_summed_penalty():
    # Row 0: ℓ_old = [ln 0.5, ln 0.5], ℓ_ref = [ln 0.25, ln 0.5] → k1 = [ln 2, 0], k3 = [0.1931472, 0].
    # Row 1: one valid token with ℓ_old = ℓ_ref (0), then padding with garbage.
    old = torch.tensor([[math.log(0.5), math.log(0.5)], [0.0, float("nan")]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [0.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards = torch.tensor([1.0, 0.0])
    shaped = kl_in_reward(rewards, old, ref, mask, beta=0.1, estimator="k1")
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.1 * math.log(2), 0.0]))
    shaped = kl_in_reward(rewards, old.requires_grad_(), ref, mask, beta=0.1)  # k3 by default
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.1 * 0.1931472, 0.0]))
    assert not shaped.requires_grad
    with pytest.raises(ValueError, match="rewards"):
        kl_in_reward(torch.zeros(3), old, ref, mask, beta=0.1)
