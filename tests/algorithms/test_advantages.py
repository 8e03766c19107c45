"""GRPO / Dr.GRPO / RLOO / REINFORCE++-baseline advantages on hand-computed groups."""

import pytest
import torch

from archer.algorithms import compute_advantages, grpo_advantages, reinforce_pp_baseline_advantages, rloo_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # two groups of 4


def test_grpo_hand_computed():
    # Group 1: mean 0.25; unbiased var = (0.75² + 3·0.25²)/3 = 0.75/3 = 0.25 → std 0.5.
    #   A = [0.75, −0.25, −0.25, −0.25] / (0.5 + 1e-6).
    # Group 2: mean 0.5; var = 4·0.25/3 = 1/3 → std 0.5773503; A = ±0.5 / (0.5773503 + 1e-6).
    expected = torch.tensor(
        [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]
        + [0.5 / 0.5773513, 0.5 / 0.5773513, -0.5 / 0.5773513, -0.5 / 0.5773513]
    )
    torch.testing.assert_close(grpo_advantages(REWARDS, 4), expected)
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "grpo"), expected)


def test_drgrpo_has_no_std_division():
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "drgrpo"), expected)


def test_rloo_leave_one_out():
    # Group 1: 1 − mean(0,0,0) = 1; 0 − mean(1,0,0) = −1/3. Group 2: 1 − mean(1,0,0) = 2/3; 0 − mean(1,1,0) = −2/3.
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])
    torch.testing.assert_close(rloo_advantages(REWARDS, 4), expected)
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "rloo"), expected)


def test_reinforce_pp_baseline_divides_by_the_batch_std():
    # Group-centred: [0.75, −0.25, −0.25, −0.25, 0.5, 0.5, −0.5, −0.5]; over the 8: Σx = 0,
    # Σx² = 0.5625 + 3·0.0625 + 4·0.25 = 1.75 → unbiased var 1.75/7 = 0.25, std 0.5 (one std for both groups).
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    expected = centred / (0.5 + 1e-6)
    torch.testing.assert_close(compute_advantages(REWARDS, 4, "reinforce_pp_baseline"), expected)
    # Rank 0 holds group 1; rank 1's moments (count, Σx, Σx²) = (4, 0, 1.0): summed over ranks, the same std.
    rank1 = torch.tensor([4.0, 0.0, 1.0], dtype=torch.float64)
    half = reinforce_pp_baseline_advantages(REWARDS[:4], 4, sum_over_ranks=lambda moments: moments + rank1)
    torch.testing.assert_close(half, expected[:4])
    # Alone, group 1 has Σx² = 0.75 over 4 → var 0.25, std 0.5 as well; group 2 alone: var 1/3.
    torch.testing.assert_close(reinforce_pp_baseline_advantages(REWARDS[4:], 4), centred[4:] / (3 ** -0.5 + 1e-6))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"])
def test_uninformative_groups_give_exact_zero_not_nan(estimator):
    # 0.1·3 = 0.30000000000000004 in floating point: a plain mean leaves a residue; we want exactly 0.
    equal = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0], dtype=torch.float64)
    advantages = compute_advantages(equal, 3, estimator)
    assert torch.equal(advantages[:3], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(advantages).all() and advantages[3:].abs().sum() > 0
    assert torch.equal(compute_advantages(torch.tensor([1.0, 0.0]), 1, estimator), torch.zeros(2))  # group of 1


def test_bad_groupings_are_rejected():
    with pytest.raises(ValueError, match="group_size=3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages(torch.zeros(2), 2, "ppo")


def test_reinforce_pp_baseline_std_leaves_out_the_rows_not_trained_on():
    # Groups of 2: [1, 0] (centred ±0.5), [1, 1] (dropped: centred 0, 0), [0, 1] (∓0.5).
    # Valid rows: the first and the last group → centred values ±0.5 (four of them), mean 0,
    # unbiased variance 4·0.25 / 3 = 1/3 → std 0.57735; advantages ±0.5 / 0.57735 = ±0.866025.
    # With the dropped zeros counted the std would be sqrt(1/5) = 0.4472 (advantages ±1.118).
    from archer.algorithms.advantages import reinforce_pp_baseline_advantages

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    valid = torch.tensor([True, True, False, False, True, True])
    out = reinforce_pp_baseline_advantages(rewards, 2, eps=0.0, valid=valid)
    expected = 0.5 / (1 / 3) ** 0.5
    torch.testing.assert_close(out, torch.tensor([expected, -expected, 0.0, 0.0, -expected, expected], dtype=torch.float64))
