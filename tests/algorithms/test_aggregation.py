"""Loss aggregation modes: hand values, padding, empty masks, and the micro-batch / data-parallel scaling identity."""

import pytest
import torch

from archer.algorithms import AGGREGATION_MODES, agg_loss, agg_units

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2 is fully padded


@pytest.mark.parametrize(
    ("mode", "norm_len", "expected"),
    [
        ("token-mean", None, 2.5),  # (1+2+3+4) / 4 tokens
        ("seq-mean-token-mean", None, 3.0),  # (6/3 + 4/1) / 2 responses (the empty row is not counted)
        ("seq-mean-token-sum", None, 5.0),  # (6 + 4) / 2
        ("seq-mean-token-sum-norm", None, 5 / 3),  # (6/3 + 4/3) / 2, norm_len = T = 3
        ("seq-mean-token-sum-norm", 10, 0.5),  # (6/10 + 4/10) / 2
    ],
)
def test_hand_computed_modes_ignore_padding_even_nan(mode, norm_len, expected):
    assert agg_loss(VALUES, MASK, mode, norm_len=norm_len).item() == pytest.approx(expected)


def test_units():
    assert agg_units(MASK, "token-mean") == 4
    assert all(agg_units(MASK, mode) == 2 for mode in AGGREGATION_MODES if mode != "token-mean")


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_empty_mask_gives_zero_not_nan(mode):
    values = torch.ones(2, 3, requires_grad=True)
    loss = agg_loss(values, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(values.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batch_and_rank_scaling_reproduces_the_whole_batch(mode):
    # The trainer's rule: each micro-batch contributes agg(local) · U_local / U_global, and with W
    # data-parallel ranks each rank multiplies by W before the all-reduce averages over ranks.
    # The result (and its gradient) must equal agg over the whole mini-batch.
    torch.manual_seed(0)
    batch, length = 8, 6
    values = torch.randn(batch, length, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(batch, length) < 0.6
    mask[3] = False  # a fully padded response
    mask[5] = True
    whole = agg_loss(values, mask, mode, norm_len=length)
    (whole_grad,) = torch.autograd.grad(whole, values)

    global_units = agg_units(mask, mode)
    world_size = 2
    ranks = [[slice(0, 1), slice(1, 4)], [slice(4, 6), slice(6, 8)]]  # two ranks, uneven micro-batches
    per_rank = []
    for micro_batches in ranks:
        rank_sum = sum(
            agg_loss(values[rows], mask[rows], mode, norm_len=length) * agg_units(mask[rows], mode) / global_units * world_size
            for rows in micro_batches
        )
        per_rank.append(rank_sum)
    all_reduced = sum(per_rank) / world_size  # DDP averages gradients over ranks
    (grad,) = torch.autograd.grad(all_reduced, values)
    torch.testing.assert_close(all_reduced, whole)
    torch.testing.assert_close(grad, whole_grad)


def test_unknown_mode_and_bad_norm_len():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        agg_loss(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="norm_len"):
        agg_loss(VALUES, MASK, "seq-mean-token-sum-norm", norm_len=0)
