"""The actor component on one process (no Lightning): the on-policy step's π_old from the update's own
forward gives the same update as a separate no-grad pass, with one forward pass less; and the rule
that decides it keeps the pass whenever something reads π_old before the update."""

from __future__ import annotations

import pytest
import torch

from archer.actor import Actor
from archer.config import RolloutCorrectionConfig, UpdateConfig
from archer.distributed import Collectives, GradientSync
from archer.experience import ExperienceMaker, old_logprob_pass_reason
from archer.losses import ArcherLoss, ClipCovLoss, DAPOLoss, HighEntropyMaskLoss
from archer.models import load_causal_lm
from archer.rewards.runner import RewardResult
from archer.rollout import HFEngine, SamplingConfig
from archer.sampling import Samples, ScoredGroups
from archer.seeding import Seeds
from archer.shaping import PerplexityShaping, PositionShaping

N = 4  # group size


def _scored(model_dir: str) -> ScoredGroups:
    """3 prompts × 4 samples from the tiny model (HF generate), with rewards 1 for even token counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = HFEngine()
    engine.setup(load_causal_lm(model_dir, "float32"), tokenizer, model_dir)
    prompts = [tokenizer.encode(text) for text in ("12+", "7*", "999")]
    groups = engine.generate(prompts, SamplingConfig(n=N, max_new_tokens=6, seed=3))
    completions = [c for group in groups for c in group]
    scores = [float(len(c.token_ids) % 2 == 0) for c in completions]
    samples = Samples([p for p in prompts for _ in range(N)], completions, [{}] * len(completions), [""] * len(completions))
    return ScoredGroups(samples, torch.tensor(scores), torch.ones(len(scores), dtype=torch.bool),
                        RewardResult(scores=scores, num_errors=0, num_timeouts=0, errors=[]))


def _step(model_dir: str, scored: ScoredGroups, *, from_update: bool):
    """One RL step of the Archer loss (β_k > 0: a reference) on fresh copies of the tiny model."""
    from transformers import AutoTokenizer

    model = load_causal_lm(model_dir, "float32")
    actor = Actor(model, load_causal_lm(model_dir, "float32", trainable=False), ArcherLoss(),
                  update=UpdateConfig(micro_batch_size=5), group_size=N, temperature=1.0, max_new_tokens=6,
                  max_grad_norm=1.0, packed=False, device=torch.device("cpu"), collectives=Collectives(),
                  gradient_sync=GradientSync())
    maker = ExperienceMaker(actor, pad_token_id=AutoTokenizer.from_pretrained(model_dir).pad_token_id,
                            max_new_tokens=6, advantage="grpo", advantage_shaping=[], overlong=None, kl_in_reward=None,
                            rollout_correction=RolloutCorrectionConfig(), engine_matches_trainer=True,
                            behaviour_ratio=False, old_logprob_from_update=from_update)
    exp = maker.make(scored)
    assert (exp.old_logprob is None) == from_update
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = actor.update(exp, optimizer, seeds=Seeds(0), step=0)
    maker.complete(exp, result.old_logprob)
    return model, exp, result, dict(actor.forward_passes)


def test_the_on_policy_update_equals_the_update_after_a_separate_pass(tiny_model_dir):
    scored = _scored(tiny_model_dir)
    separate = _step(tiny_model_dir, scored, from_update=False)
    skipped = _step(tiny_model_dir, scored, from_update=True)
    assert separate[3] == {"actor": 3 + 3, "reference": 3}  # 12 rows in micro-batches of 5: 3 no-grad + 3 update
    assert skipped[3] == {"actor": 3, "reference": 3}
    # π_old: the no-grad pass (eval mode) and the update's forward (train mode) of the same weights agree.
    mask = separate[1].rollout.response_mask.bool()
    torch.testing.assert_close(skipped[1].old_logprob[mask], separate[1].old_logprob[mask], rtol=0, atol=1e-6)
    assert skipped[1].mismatch.keys() == separate[1].mismatch.keys() != set()  # the statistics, after the update
    for key, value in separate[1].mismatch.items():  # computed from the same π_old (HF: only rounding apart)
        torch.testing.assert_close(float(skipped[1].mismatch[key]), float(value), rtol=1e-4, atol=1e-6, msg=key)
    for key in ("pg_loss", "kl", "entropy", "grad_norm"):
        torch.testing.assert_close(float(skipped[2].stats[key]), float(separate[2].stats[key]), rtol=1e-5, atol=1e-8)
    for (name, a), b in zip(separate[0].named_parameters(), skipped[0].parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(next(separate[0].parameters()), next(load_causal_lm(tiny_model_dir, "float32").parameters()))


READERS = {
    "two epochs": dict(update=UpdateConfig(ppo_epochs=2)),
    "two mini-batches": dict(update=UpdateConfig(mini_batch_size=8)),
    "asynchronous": dict(asynchronous=True),
    "kl in reward": dict(kl_in_reward=True),
    "perplexity shaping": dict(advantage_shaping=[PerplexityShaping()]),
    "clip-cov pre-pass": dict(loss=ClipCovLoss()),
    "80/20 batch threshold": dict(loss=HighEntropyMaskLoss()),
    "archer token-mean kl units": dict(loss=ArcherLoss(loss_agg="token-mean")),
    "correction weights": dict(correction_applied=True),
    "dropout": dict(dropout=True),
}


def _reason(**changes):
    settings = dict(update=UpdateConfig(), batch_size=16, loss=ArcherLoss(), advantage_shaping=[],
                    kl_in_reward=False, asynchronous=False, correction_applied=False)
    settings.update(changes)
    return old_logprob_pass_reason(settings.pop("update"), **settings)


@pytest.mark.parametrize("reader", list(READERS))
def test_anything_that_reads_old_logprobs_before_the_update_keeps_the_pass(reader):
    assert _reason(**READERS[reader]) is not None


def test_an_on_policy_step_skips_the_pass():
    assert _reason() is None
    assert _reason(update=UpdateConfig(mini_batch_size=16)) is None  # one mini-batch of the whole batch
    assert _reason(loss=DAPOLoss(), advantage_shaping=[PositionShaping()]) is None  # position shaping reads no log-prob


def test_dropout_anywhere_in_the_actor_is_seen(tiny_model_dir):
    from archer.config import LoraConfig
    from archer.experience import has_dropout
    from archer.models import add_lora

    assert not has_dropout(load_causal_lm(tiny_model_dir, "float32"))
    assert has_dropout(add_lora(load_causal_lm(tiny_model_dir, "float32"), LoraConfig(dropout=0.1)))
    model = load_causal_lm(tiny_model_dir, "float32")
    model.config.attention_dropout = 0.1  # functional dropout inside the attention kernel
    assert has_dropout(model)


def test_an_update_left_pi_old_refuses_a_plan_of_several_steps(tiny_model_dir):
    """The rule (old_logprob_pass_reason) and the plan must agree; if they do not, the actor stops
    instead of training later mini-batches with a ratio of 1."""
    scored = _scored(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, "float32")
    actor = Actor(model, None, ArcherLoss(knowledge_kl=0.0), update=UpdateConfig(ppo_epochs=2), group_size=N,
                  temperature=1.0, max_new_tokens=6, max_grad_norm=1.0, packed=False, device=torch.device("cpu"),
                  collectives=Collectives(), gradient_sync=GradientSync())
    maker = ExperienceMaker(actor, pad_token_id=0, max_new_tokens=6, advantage="grpo", advantage_shaping=[],
                            overlong=None, kl_in_reward=None, rollout_correction=RolloutCorrectionConfig(),
                            engine_matches_trainer=True, behaviour_ratio=False, old_logprob_from_update=True)
    with pytest.raises(RuntimeError, match="the update is 2 optimizer steps"):
        actor.update(maker.make(scored), torch.optim.AdamW(model.parameters()), seeds=Seeds(0), step=0)


def test_a_lora_actor_counts_its_reference_passes_as_reference(tiny_model_dir):
    from archer.config import LoraConfig
    from archer.models import add_lora

    model = add_lora(load_causal_lm(tiny_model_dir, "float32"), LoraConfig())
    actor = Actor(model, model, ArcherLoss(), update=UpdateConfig(micro_batch_size=5), group_size=N, temperature=1.0,
                  max_new_tokens=6, max_grad_norm=1.0, packed=False, device=torch.device("cpu"),
                  collectives=Collectives(), gradient_sync=GradientSync())
    maker = ExperienceMaker(actor, pad_token_id=0, max_new_tokens=6, advantage="grpo", advantage_shaping=[],
                            overlong=None, kl_in_reward=None, rollout_correction=RolloutCorrectionConfig(),
                            engine_matches_trainer=True, behaviour_ratio=False, old_logprob_from_update=True)
    actor.update(maker.make(_scored(tiny_model_dir)), torch.optim.AdamW(model.parameters()), seeds=Seeds(0), step=0)
    assert dict(actor.forward_passes) == {"actor": 3, "reference": 3}
