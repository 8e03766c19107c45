"""Property tests: random shapes, masks, settings against plain-Python float64 references (loops, no torch ops)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archer.algorithms import (
    AGGREGATION_MODES,
    agg_loss,
    cispo_loss,
    classify_tokens,
    dual_token_loss,
    gspo_loss,
    rollout_correction_weights,
)

SETTINGS = settings(max_examples=30, deadline=None)


def reference_quantile(values, rho):
    """Linear interpolation between order statistics at position ρ·(n − 1), as numpy/torch 'linear'."""
    ordered = sorted(values)
    position = rho * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def reference_reasoning(entropy, mask, rho):
    typed = []
    for row_entropy, row_mask in zip(entropy, mask):
        valid = [h for h, m in zip(row_entropy, row_mask) if m]
        threshold = reference_quantile(valid, rho) if valid else None
        typed.append([bool(m) and threshold is not None and h > threshold for h, m in zip(row_entropy, row_mask)])
    return typed


def reference_agg_weights(tokens, mode, norm_len):
    """∂agg/∂L[i][t]: every aggregation mode of aggregation.py is Σ_(i,t) w[i][t]·L[i][t] over the tokens."""
    if mode == "token-mean":
        count = sum(sum(row) for row in tokens)
        return [[1.0 / count if k else 0.0 for k in row] for row in tokens]
    responses = sum(1 for row in tokens if any(row))
    weights = []
    for row in tokens:
        n_i = sum(row)
        per_token = {"seq-mean-token-sum": 1.0, "seq-mean-token-mean": 1.0 / max(n_i, 1), "seq-mean-token-sum-norm": 1.0 / norm_len}[mode]
        weights.append([per_token / responses if k else 0.0 for k in row])
    return weights


def reference_aggregate(values, tokens, mode, norm_len):
    """values[i][t] over the (i, t) with tokens[i][t] True, by the formulas of aggregation.py (0 if none)."""
    weights = reference_agg_weights(tokens, mode, norm_len)
    return sum(w * v for w_row, v_row in zip(weights, values) for w, v in zip(w_row, v_row) if w)


def reference_dual_token_loss(logprob, old, ref, adv, entropy, mask, rho, know_clip, reas_clip, beta_k, beta_r, dual_clip, mode):
    reasoning = reference_reasoning(entropy, mask, rho)
    pg, kl = [], []
    for i in range(len(mask)):
        pg_row, kl_row = [], []
        for t in range(len(mask[i])):
            low, high = reas_clip if reasoning[i][t] else know_clip
            ratio = math.exp(min(max(logprob[i][t] - old[i][t], -20.0), 20.0))
            a = adv[i][t]
            loss = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
            if a < 0:
                loss = min(loss, -dual_clip * a)
            pg_row.append(loss)
            d = min(max(ref[i][t] - logprob[i][t], -20.0), 20.0)
            kl_row.append(min(max(math.exp(d) - d - 1, -10.0), 10.0))
        pg.append(pg_row)
        kl.append(kl_row)
    length = len(mask[0])
    knowledge = [[bool(m) and not r for m, r in zip(mr, rr)] for mr, rr in zip(mask, reasoning)]
    valid = [[bool(m) for m in row] for row in mask]
    return (
        reference_aggregate(pg, valid, mode, length)
        + beta_k * reference_aggregate(kl, knowledge, mode, length)
        + beta_r * reference_aggregate(kl, reasoning, mode, length)
    )


def clamp(value, low, high):
    return min(max(value, low), high)


def reference_gspo(logprob, old, adv, mask, clip):
    """GSPO-token loss and its gradient ∂loss/∂ℓ[i][t], by the formulas of gspo.py, written out."""
    rows = [i for i in range(len(mask)) if any(mask[i])]
    loss, grad = 0.0, [[0.0] * len(row) for row in mask]
    for i in rows:
        valid = [t for t, m in enumerate(mask[i]) if m]
        n = len(valid)
        s = math.exp(clamp(sum(clamp(logprob[i][t] - old[i][t], -20, 20) for t in valid) / n, -20, 20))
        in_band = 1 - clip[0] <= s <= 1 + clip[1]
        for t in valid:
            a = adv[i][t]
            unclipped, clipped = -a * s, -a * clamp(s, 1 - clip[0], 1 + clip[1])
            loss += max(unclipped, clipped) / n / len(rows)
            # ∂s_{i,t}/∂ℓ_t = s: the gradient flows where the unclipped branch is taken (or s is in the band).
            if in_band or unclipped > clipped:
                grad[i][t] = -a * s / n / len(rows)
    return loss, grad


def reference_cispo(logprob, old, adv, mask, clip, mode, norm_len):
    """CISPO loss Σ w_t·(−r̂_t A_t ℓ_t) (w: the aggregation weights) and its gradient −w_t r̂_t A_t."""
    weights = reference_agg_weights([[bool(m) for m in row] for row in mask], mode, norm_len)
    loss, grad = 0.0, [[0.0] * len(row) for row in mask]
    for i, row in enumerate(mask):
        for t, m in enumerate(row):
            if m:
                ratio = math.exp(clamp(logprob[i][t] - old[i][t], -20, 20))
                weight = clamp(ratio, 1 - clip[0], 1 + clip[1])
                loss += weights[i][t] * (-weight * adv[i][t] * logprob[i][t])
                grad[i][t] = -weights[i][t] * weight * adv[i][t]
    return loss, grad


def reference_correction_weights(old, rollout, mask, level, mode, upper, lower):
    """Rollout-correction weights by the formulas of rollout_correction.py, written out."""
    lower = 1 / upper if lower is None else lower
    weights = []
    for old_row, roll_row, mask_row in zip(old, rollout, mask):
        deltas = [o - r for o, r, m in zip(old_row, roll_row, mask_row) if m]
        if level == "sequence":
            sequence_ratio = math.exp(clamp(sum(deltas), -20, 20))
        elif level == "geometric":
            sequence_ratio = math.exp(clamp(sum(deltas) / max(len(deltas), 1), -20, 20))
        row = []
        for o, r, m in zip(old_row, roll_row, mask_row):
            ratio = math.exp(clamp(o - r, -20, 20)) if level == "token" else sequence_ratio
            weight = min(ratio, upper) if mode == "truncate" else ratio * (lower <= ratio <= upper)
            row.append(weight if m else 0.0)
        weights.append(row)
    return weights


def assert_close_nested(actual, expected, tol=1e-9):
    for actual_row, expected_row in zip(actual, expected):
        for a, e in zip(actual_row, expected_row):
            assert math.isclose(a, e, rel_tol=tol, abs_tol=tol), (actual, expected)


batches = st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**31 - 1), st.booleans())


def _draw(batch, length, seed, coarse):
    generator = torch.Generator().manual_seed(seed)
    entropy = torch.rand(batch, length, generator=generator) * 3
    if coarse:  # round to create ties with the threshold
        entropy = (entropy * 2).round() / 2
    mask = torch.rand(batch, length, generator=generator) < 0.7
    logprob = -torch.rand(batch, length, generator=generator) * 2
    old = logprob + 0.5 * torch.randn(batch, length, generator=generator)
    ref = logprob + 0.5 * torch.randn(batch, length, generator=generator)
    adv = torch.randn(batch, length, generator=generator)
    return logprob, old, ref, adv, entropy, mask


@SETTINGS
@given(batches, st.sampled_from([0.0, 0.3, 0.8, 1.0]))
def test_classify_tokens_matches_reference(batch, rho):
    *_, entropy, mask = _draw(*batch)
    assert classify_tokens(entropy, mask, rho).tolist() == reference_reasoning(entropy.tolist(), mask.tolist(), rho)


@SETTINGS
@given(batches, st.sampled_from(AGGREGATION_MODES))
def test_agg_loss_matches_reference(batch, mode):
    *_, values, mask = _draw(*batch)
    expected = reference_aggregate(values.tolist(), mask.tolist(), mode, values.shape[1])
    assert math.isclose(agg_loss(values, mask, mode).item(), expected, rel_tol=1e-5, abs_tol=1e-6)


@SETTINGS
@given(
    batches,
    st.sampled_from(AGGREGATION_MODES),
    st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    st.sampled_from([(0.0, 0.0), (0.001, 0.0), (0.3, 0.1)]),
    st.sampled_from([(0.2, 0.2), (0.1, 0.3)]),
)
def test_dual_token_loss_matches_float64_reference(batch, mode, rho, betas, knowledge_clip):
    logprob, old, ref, adv, entropy, mask = _draw(*batch)
    loss, _ = dual_token_loss(
        logprob, old, ref, adv, entropy, mask, rho=rho, knowledge_clip=knowledge_clip, reasoning_clip=(0.5, 0.4),
        knowledge_kl=betas[0], reasoning_kl=betas[1], dual_clip=3.0, loss_agg=mode,
    )
    expected = reference_dual_token_loss(
        logprob.tolist(), old.tolist(), ref.tolist(), adv.tolist(), entropy.tolist(), mask.tolist(),
        rho, knowledge_clip, (0.5, 0.4), betas[0], betas[1], 3.0, mode,
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-5)


def _draw64(batch, length, seed, coarse):
    logprob, old, ref, adv, entropy, mask = (t.double() if t.is_floating_point() else t for t in _draw(batch, length, seed, coarse))
    return logprob.requires_grad_(), old, ref, adv, entropy, mask


@SETTINGS
@given(batches, st.sampled_from([(0.2, 0.2), (0.05, 0.1), (3e-4, 4e-4)]))
def test_gspo_matches_float64_reference_with_gradients(batch, clip):
    logprob, old, _, adv, _, mask = _draw64(*batch)
    loss, _ = gspo_loss(logprob, old, adv, mask, clip=clip)
    expected, expected_grad = reference_gspo(logprob.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip)
    assert math.isclose(loss.item(), expected, rel_tol=1e-9, abs_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, logprob) if loss.requires_grad else (torch.zeros_like(logprob),)
    assert_close_nested(grad.tolist(), expected_grad)


@SETTINGS
@given(batches, st.sampled_from(AGGREGATION_MODES), st.sampled_from([(0.2, 0.2), (1.0, 4.0)]))
def test_cispo_matches_float64_reference_with_gradients(batch, mode, clip):
    logprob, old, _, adv, _, mask = _draw64(*batch)
    loss, _ = cispo_loss(logprob, old, adv, mask, clip=clip, loss_agg=mode)
    expected, expected_grad = reference_cispo(logprob.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip, mode, batch[1])
    assert math.isclose(loss.item(), expected, rel_tol=1e-9, abs_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, logprob) if loss.requires_grad else (torch.zeros_like(logprob),)
    assert_close_nested(grad.tolist(), expected_grad)


@SETTINGS
@given(
    batches,
    st.sampled_from(["token", "sequence", "geometric"]),
    st.sampled_from(["truncate", "mask"]),
    st.sampled_from([(2.0, None), (1.5, 0.8), (3.0, 0.1)]),
)
def test_rollout_correction_weights_match_reference(batch, level, mode, bounds):
    _, old, rollout, _, _, mask = _draw64(*batch)  # the "ref" draw stands in for the engine's log-probs
    weights = rollout_correction_weights(old, rollout, mask, level=level, mode=mode, upper=bounds[0], lower=bounds[1])
    expected = reference_correction_weights(old.tolist(), rollout.tolist(), mask.tolist(), level, mode, *bounds)
    assert_close_nested(weights.tolist(), expected)
