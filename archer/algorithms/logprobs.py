"""Per-token log-probabilities and entropies without materialising ``[B, T, V]`` float32 logits.

For each row (a response position) with logits ``x`` (``[V]``), target token ``y`` and sampling
temperature ``τ``::

    z      = x / τ                              (float32)
    lse    = logsumexp_v z_v
    ℓ      = z_y − lse                          log π(y | context)
    H      = lse − Σ_v softmax(z)_v · z_v       entropy of π(· | context), nats, full vocabulary
    ∂ℓ/∂x  = (onehot(y) − softmax(z)) / τ
    ∂H/∂x  = −p ⊙ (z − Σ_u p_u z_u) / τ          p = softmax(z)   (only with ``entropy_grad=True``)

The entropy is detached by default (token typing must not receive gradients); with
``entropy_grad=True`` it carries the gradient above, for an entropy bonus in the loss.

The rows of the flattened ``B*T`` batch are processed ``chunk_size`` at a time, in the forward AND
in the backward (a custom :class:`torch.autograd.Function` that recomputes one chunk's logits from
the saved hidden states), so the largest float32 temporary is ``[chunk_size, V]``. With a
151,936-token vocabulary that is ~0.6 GB per 1024 rows instead of ~20 GB for 32k rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs_and_entropy", "logprobs_and_entropy_from_logits"]


def _chunk_logprob_entropy(z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``z`` float32 ``[n, V]`` (overwritten), targets ``[n]`` → (ℓ ``[n]``, H ``[n]``, lse ``[n]``), formulas above.

    Works on z − max(z): both terms of H then stay within [0, ln V] and near-cancel far less in float32.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    shifted = z.sub_(row_max)
    shifted_lse = torch.logsumexp(shifted, dim=-1)
    logprob = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - shifted_lse
    probs = torch.exp(shifted - shifted_lse.unsqueeze(-1))
    entropy = shifted_lse - (probs * shifted).sum(dim=-1)
    return logprob, entropy, shifted_lse + row_max.squeeze(-1)


def _chunk_grad_logits(
    z: Tensor, lse: Tensor, targets: Tensor, grad_logprob: Tensor, grad_entropy: Tensor | None, temperature: float
) -> Tensor:
    """∂L/∂x for one chunk, float32 ``[n, V]``: ``(g_ℓ · (onehot(y) − p) − g_H · p ⊙ (z − Σ_u p_u z_u)) / τ``.

    ``z`` (float32 ``[n, V]``, recomputed for this chunk) is overwritten; ``grad_entropy`` None: no
    entropy term.
    """
    probs = torch.exp(z - lse.unsqueeze(-1))
    if grad_entropy is not None:
        expected_z = torch.linalg.vecdot(probs, z).unsqueeze(-1)  # Σ_u p_u z_u, [n, 1]
        entropy_term = z.sub_(expected_z).mul_(probs)  # p ⊙ (z − E_p z), in z's storage
    grad = probs.mul_(-grad_logprob.unsqueeze(-1))
    if grad_entropy is not None:
        grad.addcmul_(entropy_term, grad_entropy.unsqueeze(-1), value=-1.0)
    grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logprob.unsqueeze(-1))
    return grad.div_(temperature)


def _check_targets(targets: Tensor, vocab_size: int, leading_shape: torch.Size) -> None:
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be torch.long, got {targets.dtype}")
    if targets.shape != leading_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the leading dims {tuple(leading_shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"targets must lie in [0, {vocab_size}) (the vocabulary); got range "
            f"[{int(targets.min())}, {int(targets.max())}] — replace padding ids by a valid id and mask them"
        )


def _keep_settings(ctx, temperature: float, chunk_size: int, entropy_grad: bool, entropy: Tensor) -> None:
    ctx.temperature, ctx.chunk_size, ctx.entropy_grad = temperature, chunk_size, entropy_grad
    if not entropy_grad:
        ctx.mark_non_differentiable(entropy)


def _rows_of(grad: Tensor | None, rows: slice) -> Tensor | None:
    """One chunk of an incoming gradient as float32; None stays None (no entropy gradient asked for)."""
    return None if grad is None else grad[rows].float()


class _HiddenToLogprob(torch.autograd.Function):
    """ℓ and H from hidden states and the LM head, chunked over rows in forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, entropy_grad):  # type: ignore[override]
        n_rows = hidden.shape[0]
        logprob = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias)
            z = logits.float().div_(temperature)
            logprob[rows], entropy[rows], lse[rows] = _chunk_logprob_entropy(z, targets[rows])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        _keep_settings(ctx, temperature, chunk_size, entropy_grad, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):  # type: ignore[override]
        grad_entropy = grad_entropy if ctx.entropy_grad else None  # autograd passes zeros for a detached output
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the LM-head gradient over chunks in float32 even for bf16 weights: summing
        # many chunk contributions in bf16 would lose precision.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            z = torch.nn.functional.linear(h, weight, bias).float().div_(ctx.temperature)
            grad_logits = _chunk_grad_logits(
                z, lse[rows], targets[rows], _rows_of(grad_logprob, rows), _rows_of(grad_entropy, rows), ctx.temperature
            )
            del z
            if need_hidden:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


class _LogitsToLogprob(torch.autograd.Function):
    """ℓ and H from existing logits, chunked; the float32 upcast only ever exists per chunk."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, entropy_grad):  # type: ignore[override]
        n_rows = logits.shape[0]
        logprob = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            z = logits[rows].float() / temperature
            logprob[rows], entropy[rows], lse[rows] = _chunk_logprob_entropy(z, targets[rows])
        ctx.save_for_backward(logits, targets, lse)
        _keep_settings(ctx, temperature, chunk_size, entropy_grad, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):  # type: ignore[override]
        grad_entropy = grad_entropy if ctx.entropy_grad else None  # autograd passes zeros for a detached output
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            z = logits[rows].float() / ctx.temperature
            grad_logits[rows] = _chunk_grad_logits(
                z, lse[rows], targets[rows], _rows_of(grad_logprob, rows), _rows_of(grad_entropy, rows), ctx.temperature
            )
        return grad_logits, None, None, None, None


def _check_common(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def token_logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each target token and the entropy of each position's distribution.

    Logits ``x = hidden @ Wᵀ + b`` are computed ``chunk_size`` rows of the flattened ``B*T`` at a
    time, upcast to float32, divided by the temperature ``τ``; see the module docstring for ℓ, H.

    Args:
        hidden: final hidden states ``[B, T, H]`` (any float dtype; row t predicts ``targets[:, t]``).
        lm_head_weight: ``[V, H]`` output projection.
        targets: ``[B, T]`` long token ids in ``[0, V)`` (put any valid id at padding and mask it later).
        temperature: ``τ``, the rollout sampling temperature.
        chunk_size: rows per chunk; peak extra memory ≈ 3 · chunk_size · V · 4 bytes.
        lm_head_bias: optional ``[V]`` bias.
        entropy_grad: let ``entropy`` carry gradients too (∂H/∂x in the module docstring), for an
            entropy bonus in the loss; still chunked in the backward.

    Returns:
        ``(logprob, entropy)``, both float32 ``[B, T]``; ``logprob`` carries gradients to ``hidden``,
        the weight and the bias; ``entropy`` is detached (token typing only) unless ``entropy_grad``.
    """
    _check_common(temperature, chunk_size)
    if hidden.dim() != 3 or lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"expected hidden [B, T, H] and lm_head_weight [V, H]; got {tuple(hidden.shape)} and {tuple(lm_head_weight.shape)}"
        )
    _check_targets(targets, lm_head_weight.shape[0], hidden.shape[:2])
    batch, length, width = hidden.shape
    logprob, entropy = _HiddenToLogprob.apply(
        hidden.reshape(batch * length, width), lm_head_weight, lm_head_bias, targets.reshape(-1), float(temperature), chunk_size,
        entropy_grad,
    )
    return logprob.view(batch, length), entropy.view(batch, length)


def logprobs_and_entropy_from_logits(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024, entropy_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """Same as :func:`token_logprobs_and_entropy` for a model whose logits ``[B, T, V]`` already exist.

    The float32 upcast and softmax exist one chunk of ``chunk_size`` rows at a time, in the forward
    and the backward; the gradient w.r.t. ``logits`` has the logits' own dtype and shape.
    Returns ``(logprob, entropy)`` float32 ``[B, T]``, entropy detached unless ``entropy_grad``.
    """
    _check_common(temperature, chunk_size)
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, T, V], got {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[-1], logits.shape[:2])
    batch, length, vocab = logits.shape
    logprob, entropy = _LogitsToLogprob.apply(
        logits.reshape(batch * length, vocab), targets.reshape(-1), float(temperature), chunk_size, entropy_grad
    )
    return logprob.view(batch, length), entropy.view(batch, length)
