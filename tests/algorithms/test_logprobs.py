"""Chunked log-prob + entropy against hand values and the naive [B, T, V] computation, gradients included."""

import math

import pytest
import torch

from archer.algorithms import logprobs_and_entropy_from_logits, token_logprobs_and_entropy


def _naive(hidden, weight, bias, targets, temperature):
    """The textbook version: full float64 logits, log_softmax, entropy."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logprob = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprob, entropy


def test_hand_computed_two_token_vocabulary():
    # z = [0, ln 3] (logits [0, 2 ln 3] at temperature 2): softmax = [1/4, 3/4].
    # ℓ(target 1) = ln(3/4) = -0.2876821; H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3465736 + 0.2157616 = 0.5623351.
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]], requires_grad=True)
    logprob, entropy = logprobs_and_entropy_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    torch.testing.assert_close(logprob, torch.tensor([[math.log(0.75)]]))
    torch.testing.assert_close(entropy, torch.tensor([[0.5623351]]))
    logprob.sum().backward()
    # ∂ℓ/∂x = (onehot − softmax)/τ = ([0, 1] − [1/4, 3/4]) / 2 = [-0.125, 0.125].
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.125, 0.125]]]))
    assert not entropy.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_path_matches_naive_with_gradients(chunk_size, with_bias):
    torch.manual_seed(0)
    batch, length, width, vocab, temperature = 2, 7, 16, 50, 0.7  # 14 rows: chunks 3 and 4 leave a remainder
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (batch, length))
    upstream = torch.randn(batch, length)  # a non-uniform dL/dℓ

    logprob, entropy = token_logprobs_and_entropy(
        hidden, weight, targets, temperature=temperature, chunk_size=chunk_size, lm_head_bias=bias
    )
    assert logprob.dtype == entropy.dtype == torch.float32 and not entropy.requires_grad
    params = [hidden, weight] + ([bias] if with_bias else [])
    grads = torch.autograd.grad((logprob * upstream).sum(), params)

    ref_logprob, ref_entropy = _naive(hidden, weight, bias, targets, temperature)
    ref_grads = torch.autograd.grad((ref_logprob * upstream.double()).sum(), params)
    torch.testing.assert_close(logprob.double(), ref_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=0)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)  # ref: float64 math, cast back to the leaf dtype


def test_logits_path_matches_naive_with_gradients():
    torch.manual_seed(1)
    logits = (3 * torch.randn(3, 5, 40)).requires_grad_()
    targets = torch.randint(0, 40, (3, 5))
    upstream = torch.randn(3, 5)
    logprob, entropy = logprobs_and_entropy_from_logits(logits, targets, temperature=1.3, chunk_size=4)
    (grad,) = torch.autograd.grad((logprob * upstream).sum(), logits)
    logp = torch.log_softmax(logits.double() / 1.3, -1)
    ref_logprob = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref_logprob * upstream.double()).sum(), logits)
    torch.testing.assert_close(logprob.double(), ref_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)


def test_no_full_vocabulary_float32_tensor_is_saved_for_backward():
    # Autograd keeps what the backward needs: nothing of size rows × V may be among it
    # (only hidden [rows, H], the weight, targets and the per-row logsumexp).
    torch.manual_seed(2)
    rows, width, vocab = 64, 8, 500
    hidden = torch.randn(1, rows, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    saved_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        logprob, _ = token_logprobs_and_entropy(hidden, weight, torch.zeros(1, rows, dtype=torch.long), chunk_size=16)
    assert max(saved_sizes) < rows * vocab
    logprob.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


def test_bfloat16_inputs_give_float32_outputs_and_same_dtype_grads():
    torch.manual_seed(3)
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 20, (2, 3))
    logprob, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=2)
    assert logprob.dtype == torch.float32 and entropy.dtype == torch.float32
    logprob.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    ref_logprob, _ = _naive(hidden.detach(), weight.detach(), None, targets, 1.0)
    torch.testing.assert_close(logprob.double(), ref_logprob, atol=2e-2, rtol=0)  # bf16 matmul rounding


def test_bad_inputs_are_rejected_with_a_clear_error():
    hidden, weight = torch.randn(1, 2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        token_logprobs_and_entropy(hidden, weight, torch.tensor([[1, -100]]))
    with pytest.raises(TypeError, match="long"):
        token_logprobs_and_entropy(hidden, weight, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(hidden, weight, torch.tensor([[1, 2]]), temperature=0.0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logprobs_and_entropy(hidden, torch.randn(10, 5), torch.tensor([[1, 2]]))


def test_hand_computed_entropy_gradient():
    # z = [0, ln 3] at τ = 2 (logits [0, 2 ln 3]): p = [1/4, 3/4], Σ p z = (3/4) ln 3.
    # ∂H/∂x = −p (z − Σ p z)/τ = −[1/4 · (−3/4 ln 3), 3/4 · (1/4 ln 3)]/2 = [3/32 ln 3, −3/32 ln 3] = [0.1029961, −0.1029961].
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]], requires_grad=True)
    _, entropy = logprobs_and_entropy_from_logits(logits, torch.tensor([[1]]), temperature=2.0, entropy_grad=True)
    entropy.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[3 / 32 * math.log(3.0), -3 / 32 * math.log(3.0)]]]))


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_entropy_gradient_matches_float64_autograd_on_both_paths(chunk_size):
    torch.manual_seed(4)
    batch, length, width, vocab, temperature = 2, 5, 8, 30, 0.7  # 10 rows: chunk 4 leaves a remainder
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, length))
    upstream_logprob, upstream_entropy = torch.randn(batch, length), torch.randn(batch, length)
    ref_logprob, ref_entropy = _naive(hidden, weight, bias, targets, temperature)
    ref_objective = (ref_logprob * upstream_logprob.double() + ref_entropy * upstream_entropy.double()).sum()
    params = [hidden, weight, bias]
    ref_grads = torch.autograd.grad(ref_objective, params)

    logprob, entropy = token_logprobs_and_entropy(
        hidden, weight, targets, temperature=temperature, chunk_size=chunk_size, lm_head_bias=bias, entropy_grad=True
    )
    grads = torch.autograd.grad((logprob * upstream_logprob + entropy * upstream_entropy).sum(), params)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-4, rtol=1e-4)

    logits = (hidden.detach().double() @ weight.detach().double().t() + bias.detach().double()).float().requires_grad_()
    logprob, entropy = logprobs_and_entropy_from_logits(
        logits, targets, temperature=temperature, chunk_size=chunk_size, entropy_grad=True
    )
    (grad,) = torch.autograd.grad((logprob * upstream_logprob + entropy * upstream_entropy).sum(), logits)
    logp = torch.log_softmax(logits.double() / temperature, -1)
    ref = (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * upstream_logprob + -(logp.exp() * logp).sum(-1) * upstream_entropy).sum()
    torch.testing.assert_close(grad, torch.autograd.grad(ref, logits)[0], atol=1e-5, rtol=1e-5)
