"""The configurable wrappers: same numbers as the pure functions, reference needs, and jsonargparse construction."""

import pytest
import torch
from jsonargparse import ArgumentParser

from archer.algorithms import clipped_policy_loss, dual_token_loss, high_entropy_mask_loss, position_advantage_shaping
from archer.losses import ArcherLoss, DAPOLoss, GRPOLoss, HighEntropyMaskLoss, PolicyLoss
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


def test_needs_reference_follows_the_kl_coefficients():
    assert ArcherLoss().needs_reference and GRPOLoss().needs_reference
    assert not DAPOLoss().needs_reference and not HighEntropyMaskLoss().needs_reference
    assert not ArcherLoss(knowledge_kl=0.0).needs_reference
    assert ArcherLoss(knowledge_kl=0.0, reasoning_kl=0.01).needs_reference


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


def test_shaping_wrappers():
    logprob, _, _, adv, _, mask = _batch()
    assert torch.equal(PositionShaping(beta=0.3)(adv, logprob, mask, 3), position_advantage_shaping(adv, mask, beta=0.3))
    shaped = PerplexityShaping(alpha=0.0)(adv, logprob, mask, 3)
    assert torch.equal(shaped, adv.unsqueeze(-1).expand(3, 6))  # α = 0 leaves advantages unchanged
    with pytest.raises(ValueError, match="scope"):
        PerplexityShaping(scope="world")(adv, logprob, mask, 3)
