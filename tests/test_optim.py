"""``build_optimizer``: AdamW, fused or PyTorch's loop (``optim.fused``), against AdamW by hand in float64."""

from dataclasses import replace

import pytest
import torch

from archer.config import OptimConfig
from archer.optim import build_optimizer, use_fused


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
    assert [group["fused"] for group in optimizer.param_groups] == [fused]
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


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_optimizer_takes_the_configured_kernel(saved_fused):
    """A checkpoint's optimizer state brings back its groups' ``fused`` flag; ``use_fused`` (run at
    train start, after the state is loaded) sets the configured one, and the steps continue the
    same AdamW: two steps, save, load into the other kind, two more = four steps by hand."""
    config = OptimConfig(lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64).float() for _ in range(4)]
    before = torch.nn.Parameter(start.float().clone())
    optimizer, _ = build_optimizer([before], replace(config, fused=saved_fused), None)
    for g in grads[:2]:
        before.grad = g
        optimizer.step()
    saved = optimizer.state_dict()
    after = torch.nn.Parameter(before.detach().clone())
    resumed, _ = build_optimizer([after], replace(config, fused=not saved_fused), None)
    resumed.load_state_dict(saved)
    assert [group["fused"] for group in resumed.param_groups] == [saved_fused]  # what the checkpoint said
    use_fused(resumed, not saved_fused)
    assert [group["fused"] for group in resumed.param_groups] == [not saved_fused]
    for g in grads[2:]:
        after.grad = g
        resumed.step()
    assert float(resumed.state[after]["step"]) == 4.0
    expected = _adamw_by_hand(start.float().double(), [g.double() for g in grads], lr_at=lambda s: 0.01,
                              beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(after.detach().double(), expected, rtol=0, atol=2e-6)
