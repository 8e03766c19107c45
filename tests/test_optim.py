"""``build_optimizer``: AdamW, fused or PyTorch's loop (``optim.fused``), against AdamW by hand in float64."""

import math

import pytest
import torch

from archer.config import OptimConfig
from archer.optim import build_optimizer


def _adamw_by_hand(w, grads, *, lr_at, beta1, beta2, eps, weight_decay):
    """Decoupled weight decay (Loshchilov & Hutter): w ← w − lr·λ·w, then the bias-corrected Adam step."""
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        lr = lr_at(t - 1)
        w = w - lr * weight_decay * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_with_warmup_equals_the_hand_computation(fused):
    config = OptimConfig(lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2, fused=fused)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    param = torch.nn.Parameter(start.float().clone())
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer, scheduler = build_optimizer([param, frozen], config, total=None)
    assert optimizer.defaults["fused"] is fused
    assert [p for group in optimizer.param_groups for p in group["params"]] == [param]  # trainable ones only
    for g in grads:
        param.grad = g.float()
        optimizer.step()
        scheduler.step()
    # Warmup factors (s + 1) / W for s < W = 2, then 1: lr 0.005, 0.01, 0.01, 0.01.
    expected = _adamw_by_hand(start.float().double(), [g.float().double() for g in grads],
                              lr_at=lambda s: 0.01 * min(1.0, (s + 1) / 2), beta1=0.9, beta2=0.95, eps=1e-8,
                              weight_decay=0.1)
    torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=2e-6)
    assert not math.isclose(float((param.detach().double() - start).abs().max()), 0.0)
