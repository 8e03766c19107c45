"""Property tests: random shapes, masks, settings against plain-Python float64 references (loops, no torch ops)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archer.algorithms import AGGREGATION_MODES, agg_loss, classify_tokens, dual_token_loss

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


def reference_aggregate(values, tokens, mode, norm_len):
    """values[i][t] over the (i, t) with tokens[i][t] True, by the formulas of aggregation.py."""
    if mode == "token-mean":
        picked = [v for row, keep in zip(values, tokens) for v, k in zip(row, keep) if k]
        return sum(picked) / len(picked) if picked else 0.0
    per_seq = []
    for row, keep in zip(values, tokens):
        picked = [v for v, k in zip(row, keep) if k]
        if not picked:
            continue
        total = sum(picked)
        per_seq.append(
            {"seq-mean-token-sum": total, "seq-mean-token-mean": total / len(picked), "seq-mean-token-sum-norm": total / norm_len}[mode]
        )
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


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
