"""Clip-Cov / KL-Cov: the covariance, which tokens are chosen (by hand), what the loss does to them,
and the same choice when the batch is split over ranks."""

import threading

import pytest
import torch

from archer.algorithms import ClipCov, KLCov, clipped_policy_loss, select_cov_tokens, token_covariance

# Two responses of two valid tokens and one padding column (garbage there must not matter).
# mean ℓ = (−1 − 3 + 0 − 2.5)/4 = −1.625; A = [+1, −1] per response → mean A = 0.
# c = (ℓ + 1.625)·A = [[0.625, −1.375], [−1.625, 0.875]].
LOGPROB = torch.tensor([[-1.0, -3.0, 50.0], [0.0, -2.5, -50.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([[1.0, 1.0, 9.0], [-1.0, -1.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [True, True, False]])
COVARIANCE = torch.tensor([[0.625, -1.375, 0.0], [-1.625, 0.875, 0.0]], dtype=torch.float64)


def test_token_covariance_by_hand():
    covariance, n = token_covariance(LOGPROB, ADVANTAGES, MASK)
    torch.testing.assert_close(covariance, COVARIANCE)
    assert float(n) == 4


def test_kl_cov_takes_the_top_fraction():
    # k = max(1, ⌊κ·4⌋): κ = 0.25 → 1 token, the largest c (0.875 at (1, 1)); κ = 0.5 → also 0.625 at (0, 0).
    chosen = select_cov_tokens(KLCov(ratio=0.25), LOGPROB, ADVANTAGES, MASK)
    assert chosen.tolist() == [[False, False, False], [False, True, False]]
    chosen = select_cov_tokens(KLCov(ratio=0.5), LOGPROB, ADVANTAGES, MASK)
    assert chosen.tolist() == [[True, False, False], [False, True, False]]
    assert select_cov_tokens(KLCov(ratio=1e-6), LOGPROB, ADVANTAGES, MASK).sum() == 1  # at least one token
    assert not select_cov_tokens(KLCov(), LOGPROB, ADVANTAGES, torch.zeros_like(MASK)).any()  # nothing valid


def test_kl_cov_breaks_exact_ties_with_the_seeded_keys():
    # One advantage for all → A − mean A = 0 → every c_t = 0. κ = 0.5 of 4 valid tokens → exactly the 2 with the
    # smallest keys (keys = torch.rand([2, 3], float64) from the generator, the documented draw).
    same = torch.ones(2, 3, dtype=torch.float64)
    keys = torch.rand(MASK.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    smallest = keys[MASK].sort().values[1]
    chosen = select_cov_tokens(KLCov(ratio=0.5), LOGPROB, same, MASK, generator=torch.Generator().manual_seed(2))
    assert chosen.tolist() == (MASK & (keys <= smallest)).tolist() and int(chosen.sum()) == 2


def test_clip_cov_draws_among_the_band_with_the_seeded_keys():
    # Band [−1.5, 0.7] holds (0, 0) (c = 0.625) and (0, 1) (c = −1.375). r = 0.25 → K = 1: the candidate with the
    # smaller key, keys = torch.rand([2, 3], float64) from the generator (the documented draw).
    setting = ClipCov(ratio=0.25, low=-1.5, high=0.7)
    keys = torch.rand(MASK.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = [[False] * 3, [False] * 3]
    expected[0][0 if keys[0, 0] < keys[0, 1] else 1] = True
    chosen = select_cov_tokens(setting, LOGPROB, ADVANTAGES, MASK, generator=torch.Generator().manual_seed(3))
    assert chosen.tolist() == expected
    # K ≥ number of candidates → all of them; excluded tokens are never chosen.
    everything = ClipCov(ratio=1.0, low=-1.5, high=0.7)
    assert select_cov_tokens(everything, LOGPROB, ADVANTAGES, MASK).tolist() == [[True, True, False], [False] * 3]
    excluded = torch.tensor([[True, False, False], [False, False, False]])
    chosen = select_cov_tokens(everything, LOGPROB, ADVANTAGES, MASK, excluded=excluded)
    assert chosen.tolist() == [[False, True, False], [False] * 3]


def test_clip_cov_removes_the_pg_term_and_kl_cov_adds_the_penalty():
    # ℓ_old = ℓ except at (1, 1) where δ = −2.5 − (−3) = 0.5 (r = e^0.5 ≈ 1.65); no ratio clip (clip=None).
    # Token-mean over 4 valid tokens. KL-Cov (κ = 0.25) picks (1, 1): loss += β·|δ|/4 = 0.5/4, ∂/∂ℓ += β·sign(δ)/4.
    # Clip-Cov with the band [0.8, 1] picks (1, 1) (c = 0.875) only: its pg (−A·r = +1.65) leaves the loss and
    # its gradient becomes 0, while the denominator stays 4.
    logprob = LOGPROB.clone().requires_grad_()
    old = torch.where(torch.tensor([[False, False, False], [False, True, False]]), -3.0, LOGPROB)
    plain, _ = clipped_policy_loss(logprob, old, ADVANTAGES, MASK, clip=None, dual_clip=None)
    plain_grad = torch.autograd.grad(plain, logprob)[0]

    kl_cov, _ = clipped_policy_loss(logprob, old, ADVANTAGES, MASK, clip=None, dual_clip=None, cov=KLCov(ratio=0.25))
    torch.testing.assert_close(kl_cov - plain, torch.tensor(0.5 / 4, dtype=torch.float64))
    extra = torch.zeros(2, 3, dtype=torch.float64)
    extra[1, 1] = 0.25
    torch.testing.assert_close(torch.autograd.grad(kl_cov, logprob)[0] - plain_grad, extra)

    clip_cov, stats = clipped_policy_loss(
        logprob, old, ADVANTAGES, MASK, clip=None, dual_clip=None, cov=ClipCov(ratio=0.25, low=0.8, high=1.0)
    )
    # pg at (1, 1) = −A·r = e^0.5 (A = −1); removing it lowers the token-mean by e^0.5/4.
    torch.testing.assert_close(plain - clip_cov, torch.tensor(0.5, dtype=torch.float64).exp() / 4)
    grad = torch.autograd.grad(clip_cov, logprob)[0]
    assert grad[1, 1] == 0 and torch.equal(grad[0], plain_grad[0])
    assert float(stats["clipfrac"]) == pytest.approx(1 / 4)


def _on_two_ranks(work):
    """Run ``work(rank, gather)`` in two threads whose ``gather`` concatenates both ranks' tensors in rank order."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def gather_of(rank):
        def gather(values):
            slots[rank] = values
            barrier.wait()
            gathered = torch.cat(slots)
            barrier.wait()
            return gathered

        return gather

    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, work(r, gather_of(r)))) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("setting", [KLCov(ratio=0.2), ClipCov(ratio=0.15, low=-0.5, high=1.5)], ids=repr)
def test_split_over_ranks_chooses_what_the_whole_batch_chooses(setting):
    generator = torch.Generator().manual_seed(4)
    shape = (7, 6)
    logprob = -torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    advantages = torch.randn(shape[0], 1, generator=generator, dtype=torch.float64).expand(shape)
    mask = torch.rand(shape, generator=generator) < 0.7
    whole = select_cov_tokens(setting, logprob, advantages, mask, generator=torch.Generator().manual_seed(0))
    assert 0 < int(whole.sum()) < int(mask.sum())
    rows = (slice(0, 3), slice(3, 7))

    def rank_generator(rank):
        # The keys the whole batch drew for these rows: rank 1 skips rank 0's 3 rows of the same stream.
        keys = torch.Generator().manual_seed(0)
        if rank == 1:
            torch.rand(3, shape[1], generator=keys, dtype=torch.float64)
        return keys

    parts = _on_two_ranks(
        lambda rank, gather: select_cov_tokens(
            setting, logprob[rows[rank]], advantages[rows[rank]], mask[rows[rank]], generator=rank_generator(rank),
            gather=gather,
        )
    )
    assert torch.equal(torch.cat(parts), whole)
