"""Policy losses: hand-computed surrogates and gradients, padding invariance, and the equivalences between them."""

import math

import pytest
import torch

from archer.algorithms import (
    AGGREGATION_MODES,
    STAT_KEYS,
    ClipCov,
    KLCov,
    Ratio,
    cispo_loss,
    clipped_policy_loss,
    dual_token_loss,
    entropy_bonus,
    gspo_loss,
    high_entropy_mask_loss,
)


def _log(values):
    return torch.tensor([[math.log(v) for v in values]])


def test_vanilla_positive_advantage_clips_above_only():
    # A = 1, ℓ_old = 0, r = [1.1, 1.5, 0.5], band (0.2, 0.2):
    #   t0: r in band → −1.1;  t1: max(−1.5, −1.2) = −1.2 (clipped);  t2: max(−0.5, −0.8) = −0.5 (A > 0: no lower clip).
    # token-mean = (−1.1 − 1.2 − 0.5)/3 = −0.9333333; ∂/∂ℓ = −A·r/3 = [−1.1/3, 0, −0.5/3].
    logprob = _log([1.1, 1.5, 0.5]).requires_grad_()
    loss, stats = clipped_policy_loss(logprob, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), clip=(0.2, 0.2))
    torch.testing.assert_close(loss, torch.tensor(-2.8 / 3))
    loss.backward()
    torch.testing.assert_close(logprob.grad, torch.tensor([[-1.1 / 3, 0.0, -0.5 / 3]]))
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)
    assert float(stats["ratio_mean"]) == pytest.approx((1.1 + 1.5 + 0.5) / 3)


def test_vanilla_negative_advantage_and_dual_clip():
    # A = −1, r = [1.1, 0.5, 20]:
    #   t0: max(1.1, 1.1) = 1.1;  t1: max(0.5, 0.8) = 0.8 (clipped);  t2: max(20, 1.2) = 20 → dual clip min(20, 10) = 10.
    # token-mean = (1.1 + 0.8 + 10)/3 = 3.9666667; gradient only on t0: −A·r/3 = 1.1/3.
    logprob = _log([1.1, 0.5, 20.0]).requires_grad_()
    args = (logprob, torch.zeros(1, 3), torch.tensor([-1.0]), torch.ones(1, 3))
    loss, stats = clipped_policy_loss(*args, clip=(0.2, 0.2), dual_clip=10.0)
    torch.testing.assert_close(loss, torch.tensor(11.9 / 3))
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[1.1 / 3, 0.0, 0.0]]))
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    # Dual clip off: t2 = 20 with gradient 20/3.
    loss, _ = clipped_policy_loss(*args, clip=(0.2, 0.2), dual_clip=None)
    torch.testing.assert_close(loss, torch.tensor(21.9 / 3))
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[1.1 / 3, 0.0, 20 / 3]]))


def test_clip_higher_band_is_asymmetric():
    # A = 1, r = 1.25: band (0.2, 0.28) → 1.25 < 1.28, unclipped, pg = −1.25; band (0.2, 0.2) → −1.2.
    logprob = _log([1.25])
    args = (logprob, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    assert clipped_policy_loss(*args, clip=(0.2, 0.28))[0].item() == pytest.approx(-1.25)
    assert clipped_policy_loss(*args, clip=(0.2, 0.2))[0].item() == pytest.approx(-1.2)


# One response: entropies [0.1, 0.2, 0.3, 0.4, 5.0], ρ = 0.8 → q = 0.4 + 0.2·(5.0 − 0.4) = 1.32,
# so only t4 is a reasoning token. All r = 1.4, A = 1, ℓ_ref = ln 0.7 (d = ln 0.7 − ln 1.4 = −ln 2).
DUAL_ENTROPY = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0]])
K3_AT_HALF = 0.5 + math.log(2) - 1  # exp(d) − d − 1 = 0.1931472


def _dual_inputs(advantage):
    logprob = _log([1.4] * 5).requires_grad_()
    return logprob, torch.zeros(1, 5), _log([0.7] * 5), torch.tensor([advantage]), DUAL_ENTROPY, torch.ones(1, 5)


def test_dual_token_bands_go_to_the_right_type():
    # Knowledge t0..t3: tight band, 1.4 > 1.2 → −1.2 each, clipped (no PG gradient).
    # Reasoning t4: loose band, 1.4 < 1.5 → −1.4, gradient −A·r/5 = −0.28.
    # PG = (4·(−1.2) − 1.4)/5 = −1.24 (ONE aggregate over all 5 tokens).
    # KL_know = mean of k3 over the 4 knowledge tokens = 0.1931472; β_k = 0.001, β_r = 0.
    # loss = −1.24 + 0.001·0.1931472; knowledge grad = β_k·(1 − e^d)/4 = 0.001·0.5/4 = 1.25e-4.
    logprob, *rest = _dual_inputs(1.0)
    loss, stats = dual_token_loss(logprob, *rest)
    torch.testing.assert_close(loss, torch.tensor(-1.24 + 0.001 * K3_AT_HALF))
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[1.25e-4] * 4 + [-0.28]]))
    assert float(stats["reasoning_fraction"]) == pytest.approx(0.2)
    assert float(stats["clipfrac_knowledge"]) == 1.0 and float(stats["clipfrac_reasoning"]) == 0.0
    assert float(stats["kl_knowledge"]) == pytest.approx(K3_AT_HALF) and float(stats["pg_loss"]) == pytest.approx(-1.24)
    assert float(stats["entropy_reasoning"]) == pytest.approx(5.0) and float(stats["entropy_knowledge"]) == pytest.approx(0.25)


def test_kl_gradient_reaches_only_types_with_positive_beta():
    # A = 0 → no PG gradient; KL gradient = β·(1 − e^d)/n_type = β·0.5/n_type.
    logprob, *rest = _dual_inputs(0.0)
    loss, _ = dual_token_loss(logprob, *rest, knowledge_kl=0.0, reasoning_kl=0.01)
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[0.0] * 4 + [0.01 * 0.5 / 1]]))
    loss, _ = dual_token_loss(logprob, *rest, knowledge_kl=0.001, reasoning_kl=0.0)
    (grad,) = torch.autograd.grad(loss, logprob)
    torch.testing.assert_close(grad, torch.tensor([[0.001 * 0.5 / 4] * 4 + [0.0]]))


def test_entropy_gets_no_gradient_and_reference_is_required_for_kl():
    logprob, old, ref, adv, entropy, mask = _dual_inputs(1.0)
    entropy = entropy.clone().requires_grad_()
    loss, _ = dual_token_loss(logprob, old, ref, adv, entropy, mask)
    loss.backward()
    assert entropy.grad is None
    with pytest.raises(ValueError, match="need ref_logprob"):
        dual_token_loss(logprob, old, None, adv, entropy, mask)
    dual_token_loss(logprob, old, None, adv, entropy, mask, knowledge_kl=0.0)  # fine without KL
    with pytest.raises(ValueError, match="needs ref_logprob"):
        clipped_policy_loss(logprob, old, adv, mask, kl_coef=0.1)


def _sorted_quantile(values, q):
    """Reference quantile, written out: linear interpolation at position q·(n − 1) of the sorted values (NaN if empty)."""
    ordered = sorted(values.double().tolist())
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _random_batch(seed, batch=4, length=9, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logprob = (-torch.rand(batch, length, generator=generator, dtype=dtype) * 3).requires_grad_()
    old = logprob.detach() + 0.4 * torch.randn(batch, length, generator=generator, dtype=dtype)
    ref = logprob.detach() + 0.4 * torch.randn(batch, length, generator=generator, dtype=dtype)
    advantages = torch.randn(batch, length, generator=generator, dtype=dtype)
    entropy = torch.rand(batch, length, generator=generator, dtype=dtype) * 4
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[0] = False  # an empty response
    mask[1, :2] = True
    return logprob, old, ref, advantages, entropy, mask


def _all_losses(logprob, old, ref, advantages, entropy, mask, mode, **options):
    """Every policy loss, ``options`` (pg_weight, entropy_coef) passed to each."""
    vanilla = {"ref_logprob": ref, "kl_coef": 0.1, "entropy": entropy}
    return {
        "vanilla": clipped_policy_loss(logprob, old, advantages, mask, loss_agg=mode, **vanilla, **options),
        "archer": dual_token_loss(logprob, old, ref, advantages, entropy, mask, loss_agg=mode, reasoning_kl=0.05, **options),
        "mask_response": high_entropy_mask_loss(logprob, old, advantages, entropy, mask, loss_agg=mode, **options),
        "mask_batch": high_entropy_mask_loss(logprob, old, advantages, entropy, mask, loss_agg=mode, level="batch", **options),
        "clip_cov": clipped_policy_loss(
            logprob, old, advantages, mask, loss_agg=mode, cov=ClipCov(ratio=0.3, low=-1.0, high=1.0),
            generator=torch.Generator().manual_seed(0), **vanilla, **options,
        ),
        "kl_cov": clipped_policy_loss(
            logprob, old, advantages, mask, loss_agg=mode, clip=None, cov=KLCov(ratio=0.3), **vanilla, **options
        ),
        "gspo": gspo_loss(logprob, old, advantages, mask, clip=(0.1, 0.1), **vanilla, **options),
        "cispo": cispo_loss(logprob, old, advantages, mask, clip=(0.2, 0.3), loss_agg=mode, **vanilla, **options),
    }


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_padding_never_affects_loss_or_gradients(mode):
    logprob, old, ref, advantages, entropy, mask = _random_batch(1)
    garbage = torch.randn(mask.shape) * 1e3  # large random values at padding
    padded = ~mask
    weight = torch.rand(mask.shape) * 2

    def scrambled(tensor):
        return torch.where(padded, garbage, tensor.detach())

    logprob2 = scrambled(logprob).requires_grad_()
    options = {"entropy_coef": 0.01}
    first = _all_losses(logprob, old, ref, advantages, entropy, mask, mode, pg_weight=weight, **options)
    second = _all_losses(
        logprob2, scrambled(old), scrambled(ref), scrambled(advantages), scrambled(entropy), mask, mode,
        pg_weight=torch.where(padded, float("nan"), weight), **options,
    )
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), name
        (grad1,) = torch.autograd.grad(first[name][0], logprob)
        (grad2,) = torch.autograd.grad(second[name][0], logprob2)
        assert torch.equal(grad1, grad2), name
        assert torch.equal(grad2[padded], torch.zeros(int(padded.sum()))), name


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_archer_with_rho_one_is_vanilla_with_knowledge_settings(mode):
    # ρ = 1 → q = max → no reasoning tokens: Archer reduces to one band + one KL over all tokens, exactly.
    logprob, old, ref, advantages, entropy, mask = _random_batch(2)
    archer, archer_stats = dual_token_loss(
        logprob, old, ref, advantages, entropy, mask, rho=1.0, knowledge_clip=(0.2, 0.25), knowledge_kl=0.1, loss_agg=mode
    )
    vanilla, _ = clipped_policy_loss(
        logprob, old, advantages, mask, clip=(0.2, 0.25), ref_logprob=ref, kl_coef=0.1, loss_agg=mode
    )
    assert float(archer_stats["reasoning_fraction"]) == 0.0
    torch.testing.assert_close(archer, vanilla)
    torch.testing.assert_close(torch.autograd.grad(archer, logprob)[0], torch.autograd.grad(vanilla, logprob)[0])


def test_archer_with_equal_clips_is_vanilla_with_count_weighted_betas_under_token_mean():
    # With token-mean, KL_know = S_k/n_k and KL_reas = S_r/n_r, while the uniform KL is (S_k + S_r)/n.
    # So β_k = β·n_k/n and β_r = β·n_r/n make Archer (equal clips) exactly vanilla + β·KL.
    logprob, old, ref, advantages, entropy, mask = _random_batch(3)
    n_reasoning = sum(int(((row > _sorted_quantile(row[valid], 0.8)) & valid).sum()) for row, valid in zip(entropy, mask))
    n_valid = int(mask.sum())
    beta = 0.2
    archer, _ = dual_token_loss(
        logprob, old, ref, advantages, entropy, mask, knowledge_clip=(0.2, 0.3), reasoning_clip=(0.2, 0.3),
        knowledge_kl=beta * (n_valid - n_reasoning) / n_valid, reasoning_kl=beta * n_reasoning / n_valid,
    )
    vanilla, _ = clipped_policy_loss(logprob, old, advantages, mask, clip=(0.2, 0.3), ref_logprob=ref, kl_coef=beta)
    torch.testing.assert_close(archer, vanilla)
    torch.testing.assert_close(torch.autograd.grad(archer, logprob)[0], torch.autograd.grad(vanilla, logprob)[0])


def test_archer_with_rho_zero_types_all_but_each_responses_minimum():
    logprob, old, ref, advantages, entropy, mask = _random_batch(4)
    _, stats = dual_token_loss(logprob, old, ref, advantages, entropy, mask, rho=0.0)
    # Continuous random entropies: exactly one minimum per non-empty response is a knowledge token.
    non_empty = int(mask.any(-1).sum())
    assert float(stats["reasoning_fraction"]) == pytest.approx(1 - non_empty / int(mask.sum()))


@pytest.mark.parametrize("level", ["response", "batch"])
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_high_entropy_mask_equals_vanilla_on_the_kept_tokens(level, mode):
    logprob, old, _, advantages, entropy, mask = _random_batch(5)
    if level == "response":
        kept = torch.stack([(row > _sorted_quantile(row[valid], 0.8)) & valid for row, valid in zip(entropy, mask)])
    else:
        kept = (entropy > _sorted_quantile(entropy[mask], 0.8)) & mask
    masked, stats = high_entropy_mask_loss(logprob, old, advantages, entropy, mask, level=level, loss_agg=mode)
    vanilla, _ = clipped_policy_loss(logprob, old, advantages, kept, clip=(0.2, 0.28), loss_agg=mode)
    assert torch.equal(masked, vanilla)
    torch.testing.assert_close(torch.autograd.grad(masked, logprob)[0], torch.autograd.grad(vanilla, logprob)[0])
    assert float(stats["reasoning_fraction"]) == pytest.approx(int(kept.sum()) / int(mask.sum()))


def test_batch_level_and_response_level_masks_differ():
    # Row 0 entropies [1, 2, 3, 4, 5], row 1 [10, 20, 30, 40, 50], ρ = 0.8.
    # Per response: q = [4.2, 42] → keep 5 and 50.
    # Batch: sorted [1, 2, 3, 4, 5, 10, 20, 30, 40, 50], position 0.8·9 = 7.2 → q = 30 + 0.2·10 = 32 → keep 40 and 50.
    # With A = 1, r = 1 only kept tokens get a gradient.
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]])
    mask = torch.ones(2, 5)
    kept = {}
    for level in ("response", "batch"):
        logprob = torch.zeros(2, 5, requires_grad=True)
        loss, _ = high_entropy_mask_loss(logprob, torch.zeros(2, 5), torch.ones(2), entropy, mask, level=level)
        loss.backward()
        kept[level] = (logprob.grad != 0).tolist()
    assert kept["response"] == [[False, False, False, False, True], [False, False, False, False, True]]
    assert kept["batch"] == [[False] * 5, [False, False, False, True, True]]


def test_every_loss_returns_the_same_ratio_stats():
    batch = _random_batch(6)
    for name, (loss, stats) in _all_losses(*batch, "token-mean").items():
        assert tuple(stats) == STAT_KEYS, name
        assert all(isinstance(value, Ratio) and not value.num.requires_grad for value in stats.values()), name
        assert loss.dim() == 0 and loss.requires_grad


def test_per_response_advantages_broadcast_like_per_token_ones():
    logprob, old, ref, advantages, entropy, mask = _random_batch(7)
    per_response = advantages[:, 0]
    first, _ = dual_token_loss(logprob, old, ref, per_response, entropy, mask)
    second, _ = dual_token_loss(logprob, old, ref, per_response.unsqueeze(-1).expand_as(mask), entropy, mask)
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="advantages"):
        dual_token_loss(logprob, old, ref, advantages[:, :3], entropy, mask)


def test_invalid_settings_are_rejected():
    logprob, old, ref, advantages, entropy, mask = _random_batch(8)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logprob, old, advantages, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="reasoning_clip"):
        dual_token_loss(logprob, old, ref, advantages, entropy, mask, reasoning_clip=(-0.1, 0.5))
    with pytest.raises(ValueError, match="old_logprob"):
        clipped_policy_loss(logprob, old[:, :2], advantages, mask)


def test_pg_weight_multiplies_the_pg_term_only():
    logprob, old, ref, advantages, entropy, mask = _random_batch(9, dtype=torch.float64)
    batch = (logprob, old, ref, advantages, entropy, mask, "token-mean")
    ones = torch.ones(mask.shape, dtype=torch.float64)

    def losses(**options):
        return {name: loss for name, (loss, _) in _all_losses(*batch, **options).items()}

    plain, one, zero, three = losses(), losses(pg_weight=ones), losses(pg_weight=0 * ones), losses(pg_weight=3 * ones)
    no_advantage = (logprob, old, ref, torch.zeros_like(advantages), entropy, mask, "token-mean")
    silent = {name: loss for name, (loss, _) in _all_losses(*no_advantage).items()}
    for name in plain:
        assert torch.equal(one[name], plain[name]), name  # w = 1 changes nothing
        # The weighted part is linear in w; KL and the denominators are untouched.
        torch.testing.assert_close(three[name] - zero[name], 3 * (one[name] - zero[name]), msg=name)
        for_grad = torch.autograd.grad(three[name] - zero[name] - 3 * (one[name] - zero[name]), logprob)[0]
        torch.testing.assert_close(for_grad, torch.zeros_like(for_grad), msg=name)
        if name != "kl_cov":  # (KL-Cov's penalty is part of pg_t, so A = 0 keeps it while w = 0 removes it)
            torch.testing.assert_close(zero[name], silent[name], msg=name)  # w = 0: only the KL terms remain


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropy_bonus_is_added_to_every_loss_with_its_gradient(mode):
    logprob, old, ref, advantages, entropy, mask = _random_batch(10, dtype=torch.float64)
    entropy = entropy.requires_grad_()
    with_bonus = _all_losses(logprob, old, ref, advantages, entropy, mask, mode, entropy_coef=0.1)
    without = _all_losses(logprob, old, ref, advantages, entropy, mask, mode)
    # Reference: −0.1 · (token mean of H, or mean over non-empty responses of their token mean of H).
    token_mean = -0.1 * entropy[mask].mean()
    rows = [entropy[i][mask[i]].mean() for i in range(mask.shape[0]) if mask[i].any()]
    seq_mean = -0.1 * torch.stack(rows).mean()
    references = {kind: (value, torch.autograd.grad(value, entropy)[0]) for kind, value in (("token", token_mean), ("seq", seq_mean))}
    for name in with_bonus:
        expected, expected_grad = references["seq" if mode == "seq-mean-token-mean" or name == "gspo" else "token"]
        torch.testing.assert_close(with_bonus[name][0] - without[name][0], expected, msg=name)
        torch.testing.assert_close(torch.autograd.grad(with_bonus[name][0], entropy)[0], expected_grad, msg=name)
        assert torch.autograd.grad(without[name][0], entropy, allow_unused=True)[0] is None, name
    with pytest.raises(ValueError, match="entropy_coef"):
        clipped_policy_loss(logprob, old, advantages, mask, entropy_coef=0.1)


def test_entropy_bonus_by_hand():
    # H = [1, 2 | padding]: token mean 1.5 → −0.1·1.5 = −0.15; ∂/∂H = −0.1/2 per valid token.
    entropy = torch.tensor([[1.0, 2.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    bonus = entropy_bonus(entropy, torch.tensor([[1, 1, 0]]), coef=0.1)
    torch.testing.assert_close(bonus, torch.tensor(-0.15, dtype=torch.float64))
    torch.testing.assert_close(torch.autograd.grad(bonus, entropy)[0], torch.tensor([[-0.05, -0.05, 0.0]], dtype=torch.float64))
