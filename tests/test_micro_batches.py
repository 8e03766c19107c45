"""Micro-batch planning (archer/micro_batches.py): hand-worked plans, and the update-plan invariants."""

import torch

from archer.micro_batches import global_group_order, lockstep, plan_update, split_rows

ROWS = torch.arange(6)
# (prompt, response) lengths; totals 12, 3, 8, 4, 11, 2
LENGTHS = torch.tensor([[2, 10], [2, 1], [3, 5], [2, 2], [2, 9], [1, 1]])


def _lists(micro_batches):
    return [m.tolist() for m in micro_batches]


def test_without_a_budget_rows_are_cut_in_order():
    assert _lists(split_rows(ROWS, LENGTHS, max_sequences=4)) == [[0, 1, 2, 3], [4, 5]]


def test_padded_budget_groups_by_length():
    # Longest first: 0 (12), 4 (11), 2 (8), 3 (4), 1 (3), 5 (2); budget 24 padded tokens:
    # [0, 4]: 2 rows × (2 + 10) = 24 ✓; + row 2 → 3 × (3 + 10) = 39 ✗
    # [2, 3, 1]: 3 × (3 + 5) = 24 ✓; + row 5 → 4 × 8 = 32 ✗ → [5]
    assert _lists(split_rows(ROWS, LENGTHS, max_sequences=99, max_tokens=24)) == [[0, 4], [2, 3, 1], [5]]


def test_packed_budget_counts_real_tokens_only():
    # [0, 4]: 12 + 11 = 23 ✓, + 8 = 31 ✗; [2, 3, 1, 5]: 8 + 4 + 3 + 2 = 17 ✓
    assert _lists(split_rows(ROWS, LENGTHS, max_sequences=99, max_tokens=24, packed=True)) == [[0, 4], [2, 3, 1, 5]]


def test_a_row_over_the_budget_goes_alone():
    assert _lists(split_rows(ROWS[:2], LENGTHS[:2], max_sequences=99, max_tokens=5)) == [[0], [1]]


def test_lockstep_pads_every_rank_to_the_largest_count():
    per_rank = [[torch.tensor([0, 1])], [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])], []]
    assert [len(m) for m in lockstep(per_rank, 0)] == [2, 0, 0]
    assert [len(m) for m in lockstep(per_rank, 2)] == [0, 0, 0]
    assert [len(m) for m in lockstep([[], []], 1)] == [0]  # at least one (a placeholder)


def test_informative_groups_come_first_in_a_seeded_or_identity_order():
    informative = torch.tensor([False, True, False, True])
    assert global_group_order(informative).tolist() == [1, 3, 0, 2]
    seeded = global_group_order(informative, seed=3)
    assert sorted(seeded[:2].tolist()) == [1, 3] and sorted(seeded[2:].tolist()) == [0, 2]
    assert torch.equal(seeded, global_group_order(informative, seed=3))


def test_the_plan_trains_the_same_global_mini_batches_on_one_and_two_ranks():
    # 8 global groups of 2 rows, informative 0, 2, 3, 6; mini-batches of 4 groups, 2 epochs.
    informative = torch.tensor([True, False, True, True, False, False, True, False])
    one = plan_update(informative, [torch.ones(16, 2, dtype=torch.long)], rank=0, group_size=2,
                      groups_per_minibatch=4, epoch_seeds=[None, None], max_sequences=3)
    # Order [0, 2, 3, 6 | 1, 4, 5, 7]: step 0 = informative groups 0, 2, 3, 6 (rows 0-1, 4-5, 6-7, 12-13);
    # step 1 = no informative group: nothing to compute (one empty micro-batch).
    assert [sorted(torch.cat(step).tolist()) for step in one] == [[0, 1, 4, 5, 6, 7, 12, 13], [], [0, 1, 4, 5, 6, 7, 12, 13], []]
    # Two ranks: rank r holds global groups r, r + 2, ... as local groups 0, 1, ...
    lengths = [torch.ones(8, 2, dtype=torch.long)] * 2
    two = [plan_update(informative, lengths, rank=r, group_size=2, groups_per_minibatch=4, epoch_seeds=[None, None],
                       max_sequences=3) for r in (0, 1)]
    for step in range(4):
        assert len(two[0][step]) == len(two[1][step])  # lockstep
        global_rows = sorted(
            (local_row // 2 * 2 + r) * 2 + local_row % 2  # local group → global group, row within the group
            for r in (0, 1) for local_row in torch.cat(two[r][step]).tolist()
        )
        assert global_rows == sorted(torch.cat(one[step]).tolist())
