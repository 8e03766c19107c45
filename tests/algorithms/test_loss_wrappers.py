"""The configurable wrappers: same numbers as the pure functions, reference needs, and jsonargparse construction."""

import pytest
import torch
from jsonargparse import ArgumentParser

from archer.algorithms import (
    ClipCov,
    KLCov,
    cispo_loss,
    clipped_policy_loss,
    dual_token_loss,
    gspo_loss,
    high_entropy_mask_loss,
    position_advantage_shaping,
)
from archer.distributed import Collectives
from archer.losses import (
    ArcherLoss,
    CISPOLoss,
    ClipCovLoss,
    DAPOLoss,
    GRPOLoss,
    GSPOLoss,
    HighEntropyMaskLoss,
    KLCovLoss,
    PolicyLoss,
)
from archer.shaping import AdvantageShaping, PerplexityShaping, PositionShaping


def _batch():
    generator = torch.Generator().manual_seed(0)
    logprob = -torch.rand(3, 6, generator=generator)
    old = logprob + 0.3 * torch.randn(3, 6, generator=generator)
    ref = logprob + 0.3 * torch.randn(3, 6, generator=generator)
    return logprob, old, ref, torch.randn(3, generator=generator), torch.rand(3, 6, generator=generator), torch.ones(3, 6)


def test_wrappers_call_the_pure_functions_with_their_defaults():
    logprob, old, ref, adv, entropy, mask = _batch()
    expected = dual_token_loss(logprob, old, ref, adv, entropy, mask, loss_agg="seq-mean-token-mean")[0]
    assert torch.equal(ArcherLoss()(logprob, old, ref, adv, entropy, mask)[0], expected)
    expected = clipped_policy_loss(logprob, old, adv, mask, clip=(0.2, 0.28), loss_agg="token-mean")[0]
    assert torch.equal(DAPOLoss()(logprob, old, None, adv, entropy, mask)[0], expected)
    expected = clipped_policy_loss(
        logprob, old, adv, mask, ref_logprob=ref, kl_coef=0.001, loss_agg="seq-mean-token-mean"
    )[0]
    assert torch.equal(GRPOLoss()(logprob, old, ref, adv, entropy, mask)[0], expected)
    expected = high_entropy_mask_loss(logprob, old, adv, entropy, mask, level="batch")[0]
    assert torch.equal(HighEntropyMaskLoss()(logprob, old, None, adv, entropy, mask)[0], expected)
    expected = gspo_loss(logprob, old, adv, mask, clip=(3e-4, 4e-4))[0]
    assert torch.equal(GSPOLoss()(logprob, old, None, adv, entropy, mask)[0], expected)
    expected = cispo_loss(logprob, old, adv, mask, clip=(1.0, 4.0), loss_agg="token-mean")[0]
    assert torch.equal(CISPOLoss()(logprob, old, None, adv, entropy, mask)[0], expected)
    expected = clipped_policy_loss(logprob, old, adv, mask, clip=None, dual_clip=None, cov=KLCov(ratio=2e-3, coef=1.0))[0]
    assert torch.equal(KLCovLoss()(logprob, old, None, adv, entropy, mask)[0], expected)
    cov = ClipCov(ratio=2e-4, low=1.0, high=5.0)
    expected = clipped_policy_loss(
        logprob, old, adv, mask, clip=(1.0, 1.0), dual_clip=None, cov=cov, generator=torch.Generator().manual_seed(0)
    )[0]
    context = ClipCovLoss().minibatch_context(mask, Collectives(), logprob=logprob, old_logprob=old, advantages=adv[:, None].expand(3, 6), seed=0)
    assert torch.equal(ClipCovLoss()(logprob, old, None, adv, entropy, mask, context=context)[0], expected)


def test_needs_reference_follows_the_kl_coefficients():
    assert ArcherLoss().needs_reference and GRPOLoss().needs_reference
    assert not DAPOLoss().needs_reference and not HighEntropyMaskLoss().needs_reference
    assert not ArcherLoss(knowledge_kl=0.0).needs_reference
    assert ArcherLoss(knowledge_kl=0.0, reasoning_kl=0.01).needs_reference
    assert not any(loss.needs_reference for loss in (GSPOLoss(), CISPOLoss(), ClipCovLoss(), KLCovLoss()))
    assert GSPOLoss(kl_coef=0.01).needs_reference and CISPOLoss(kl_coef=0.01).needs_reference


def test_needs_entropy_grad_and_minibatch_forward():
    assert not any(loss.needs_entropy_grad for loss in PRESETS if not loss.entropy_coef)
    assert DAPOLoss(entropy_coef=0.001).needs_entropy_grad and ArcherLoss(entropy_coef=-0.01).needs_entropy_grad
    assert ClipCovLoss().needs_minibatch_forward and KLCovLoss().needs_minibatch_forward
    assert not GSPOLoss().needs_minibatch_forward and not CISPOLoss().needs_minibatch_forward
    with pytest.raises(ValueError, match="old_logprob"):
        ClipCovLoss().minibatch_context(torch.ones(1, 2), Collectives(), logprob=torch.zeros(1, 2))


def test_jsonargparse_builds_losses_and_shapings_from_class_path():
    parser = ArgumentParser()
    parser.add_argument("--loss", type=PolicyLoss)
    parser.add_argument("--shaping", type=AdvantageShaping)
    config = parser.parse_object(
        {
            "loss": {"class_path": "archer.losses.ArcherLoss", "init_args": {"reasoning_clip": [0.4, 0.45], "rho": 0.7}},
            "shaping": {"class_path": "archer.shaping.PositionShaping", "init_args": {"beta": 0.2}},
        }
    )
    built = parser.instantiate_classes(config)
    assert isinstance(built.loss, ArcherLoss) and built.loss.reasoning_clip == (0.4, 0.45) and built.loss.rho == 0.7
    assert built.loss.loss_agg == "seq-mean-token-mean"
    assert isinstance(built.shaping, PositionShaping) and built.shaping.beta == 0.2
    for name, init_args in [
        ("GSPOLoss", {"clip": [0.001, 0.002]}),
        ("CISPOLoss", {"entropy_coef": 0.001}),
        ("ClipCovLoss", {"clip_cov_bounds": [0.5, 4.0]}),
        ("KLCovLoss", {"clip": None, "kl_cov_ratio": 0.01}),
    ]:
        parser = ArgumentParser()
        parser.add_argument("--loss", type=PolicyLoss)
        loss = parser.instantiate_classes(
            parser.parse_object({"loss": {"class_path": f"archer.losses.{name}", "init_args": init_args}})
        ).loss
        assert type(loss).__name__ == name, name


def test_shaping_wrappers():
    logprob, _, _, adv, _, mask = _batch()
    assert torch.equal(PositionShaping(beta=0.3)(adv, logprob, mask, 3), position_advantage_shaping(adv, mask, beta=0.3))
    shaped = PerplexityShaping(alpha=0.0)(adv, logprob, mask, 3)
    assert torch.equal(shaped, adv.unsqueeze(-1).expand(3, 6))  # α = 0 leaves advantages unchanged
    with pytest.raises(ValueError, match="scope"):
        PerplexityShaping(scope="world")(adv, logprob, mask, 3)


# Every preset, in the modes whose denominators depend on the micro-batch: token counts of a type,
# responses with a reasoning token, kept tokens, a batch-level entropy threshold, the tokens Clip-Cov
# and KL-Cov choose over the mini-batch; the entropy bonus over all valid tokens.
PRESETS = [
    ArcherLoss(),
    ArcherLoss(loss_agg="token-mean", reasoning_kl=0.05),
    ArcherLoss(loss_agg="seq-mean-token-sum-norm", reasoning_kl=0.05, entropy_coef=0.01),
    GRPOLoss(),
    DAPOLoss(),
    DAPOLoss(entropy_coef=0.01),
    HighEntropyMaskLoss(),
    HighEntropyMaskLoss(level="response", loss_agg="seq-mean-token-mean", entropy_coef=0.01),
    GSPOLoss(),
    GSPOLoss(clip=(0.05, 0.05), kl_coef=0.01, entropy_coef=0.01),
    CISPOLoss(),
    CISPOLoss(clip=(0.1, 0.1), loss_agg="seq-mean-token-mean"),
    ClipCovLoss(),
    ClipCovLoss(clip=(0.2, 0.2), clip_cov_ratio=0.1, clip_cov_bounds=(-0.5, 1.0), loss_agg="seq-mean-token-mean"),
    KLCovLoss(),
    KLCovLoss(kl_cov_ratio=0.2, kl_coef=0.01, loss_agg="token-mean"),
]


def _preset_batch():
    generator = torch.Generator().manual_seed(1)
    shape = (7, 9)
    logprob = (-torch.rand(shape, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    old = logprob.detach() + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    ref = logprob.detach() + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    advantages = torch.randn(shape[0], generator=generator, dtype=torch.float64)
    entropy = torch.rand(shape, generator=generator, dtype=torch.float64) * 4
    mask = torch.rand(shape, generator=generator) < 0.7
    mask[2] = False  # a dropped (fully masked) response
    mask[:, 0] = mask[:, 0] | torch.arange(shape[0]).ne(2)
    return logprob, old, ref, advantages, entropy, mask


def _context(loss, logprob, old, advantages, entropy, mask, seed=5):
    forward = {"entropy": entropy, "logprob": logprob.detach(), "old_logprob": old,
               "advantages": advantages[:, None].expand(mask.shape)}
    return loss.minibatch_context(mask, Collectives(), seed=seed, **(forward if loss.needs_minibatch_forward else {}))


@pytest.mark.parametrize("loss", PRESETS, ids=repr)
def test_micro_batches_with_the_minibatch_context_add_up_to_the_whole_batch(loss):
    """Split a batch into uneven micro-batches; with the context each part divides by the whole
    batch's units (and uses the mini-batch's choices), so the parts' losses, gradients and stats add
    up to the whole batch's."""
    logprob, old, ref, advantages, entropy, mask = _preset_batch()
    context = _context(loss, logprob, old, advantages, entropy, mask)
    whole, whole_stats = loss(logprob, old, ref, advantages, entropy, mask, norm_len=9,
                              context=loss.micro_batch_context(context, slice(None)))
    (whole_grad,) = torch.autograd.grad(whole, logprob)

    total, stats = 0.0, None
    for rows in (slice(0, 1), slice(1, 4), slice(4, 5), slice(5, 7)):
        part, part_stats = loss(logprob[rows], old[rows], ref[rows], advantages[rows], entropy[rows], mask[rows],
                                norm_len=9, context=loss.micro_batch_context(context, rows))
        total = total + part
        stats = part_stats if stats is None else {k: stats[k] + part_stats[k] for k in stats}
    (grad,) = torch.autograd.grad(total, logprob)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(grad, whole_grad)
    for key in ("pg_loss", "clipfrac", "entropy", "reasoning_fraction", "kl_knowledge"):
        torch.testing.assert_close(torch.tensor(float(stats[key])), torch.tensor(float(whole_stats[key])),
                                   equal_nan=True, msg=key)


@pytest.mark.parametrize("loss", [loss for loss in PRESETS if not isinstance(loss, ClipCovLoss)], ids=repr)
def test_the_whole_batch_context_is_what_the_loss_computes_alone(loss):
    # (Clip-Cov's random choice depends on the generator; its context is checked against the pure
    # function with the same seed in test_wrappers_call_the_pure_functions_with_their_defaults.)
    logprob, old, ref, advantages, entropy, mask = _preset_batch()
    context = loss.micro_batch_context(_context(loss, logprob, old, advantages, entropy, mask), slice(None))
    alone, _ = loss(logprob, old, ref, advantages, entropy, mask, norm_len=9)
    torch.testing.assert_close(loss(logprob, old, ref, advantages, entropy, mask, norm_len=9, context=context)[0], alone)


def test_a_micro_batch_trimmed_to_fewer_columns_gets_its_rows_and_columns_of_the_choice():
    logprob, old, ref, advantages, entropy, mask = _preset_batch()
    rows, width = slice(3, 5), 6
    mask[rows, width:] = False  # these two responses end before column 6: their micro-batch is trimmed to 6 columns
    loss = KLCovLoss(kl_cov_ratio=0.3)
    context = _context(loss, logprob, old, advantages, entropy, mask)
    assert context["cov_tokens"][rows].any()
    trimmed, _ = loss(logprob[rows, :width], old[rows, :width], ref[rows, :width], advantages[rows], entropy[rows, :width],
                      mask[rows, :width], context=loss.micro_batch_context(context, rows))
    full, _ = loss(logprob[rows], old[rows], ref[rows], advantages[rows], entropy[rows], mask[rows],
                   context=loss.micro_batch_context(context, rows))
    torch.testing.assert_close(trimmed, full)


def test_without_the_context_a_micro_batch_is_its_own_batch():
    # The 80/20 batch threshold of one micro-batch alone differs from the whole batch's: this is
    # what the context fixes (the test above would fail without it).
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]], dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    context = HighEntropyMaskLoss().minibatch_context(mask, Collectives(), entropy=entropy)
    # Sorted [1..5, 10..50], position 0.8·9 = 7.2 → q = 30 + 0.2·10 = 32; kept: 40, 50 (2 tokens).
    assert float(context["threshold"]) == pytest.approx(32.0) and int(context["units"]) == 2
    alone = HighEntropyMaskLoss().minibatch_context(mask[:1], Collectives(), entropy=entropy[:1])
    assert float(alone["threshold"]) == pytest.approx(4.2)  # row 0 alone: q = 4 + 0.2·1
