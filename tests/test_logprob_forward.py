"""The trainer's log-prob forward (``archer.actor.response_logprobs``), padded and packed, against a
brute-force reference: each sequence alone through the model, full-vocabulary ``log_softmax(logits / T)``."""

import pytest
import torch

from archer.actor import response_logprobs
from archer.models import load_causal_lm
from archer.rollout.base import Completion
from archer.rollout.batch import collate_rollout

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, "float32")


def _batch():
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (n,), generator=generator).tolist() for n in (3, 7, 5)]
    responses = [torch.randint(3, 60, (n,), generator=generator).tolist() for n in (6, 2, 4)]
    completions = [Completion(token_ids=r, logprobs=None, finish_reason="length") for r in responses]
    return prompts, responses, collate_rollout(prompts, completions, pad_token_id=0)


def _reference(model, prompts, responses):
    out = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].double() / TEMPERATURE
            logp = torch.log_softmax(logits, -1)
            out.append((logp.gather(-1, torch.tensor(response)[:, None])[:, 0], -(logp.exp() * logp).sum(-1)))
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_logprobs_and_entropies_match_each_sequence_alone(actor, packed):
    prompts, responses, batch = _batch()
    logprob, entropy, computed = response_logprobs(actor, batch, TEMPERATURE, packed=packed)
    real = sum(map(len, prompts)) + sum(map(len, responses))
    assert (float(computed.num), float(computed.den)) == (real, real if packed else batch.input_ids.numel())
    for i, (ref_logprob, ref_entropy) in enumerate(_reference(actor, prompts, responses)):
        n = len(responses[i])
        torch.testing.assert_close(logprob[i, :n].double(), ref_logprob, rtol=0, atol=2e-5)
        torch.testing.assert_close(entropy[i, :n].double(), ref_entropy, rtol=0, atol=2e-5)
        assert (logprob[i, n:] == 0).all() and (entropy[i, n:] == 0).all()  # nothing past the response


def test_packed_and_padded_give_the_same_gradients(actor):
    _, _, batch = _batch()
    grads = []
    for packed in (False, True):
        actor.zero_grad()
        response_logprobs(actor, batch, TEMPERATURE, packed=packed)[0].sum().backward()
        grads.append({name: p.grad.clone() for name, p in actor.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_forward_keeps_only_the_last_hidden_state(actor):
    """The decoder is asked for its last hidden state only: no per-layer outputs are kept alive, and the
    vocabulary projection runs on the response tokens only (not on logits for every position)."""
    seen = []
    hook = actor.get_decoder().register_forward_hook(lambda mod, args, kwargs, out: seen.append((kwargs, out)),
                                                              with_kwargs=True)
    try:
        response_logprobs(actor, _batch()[2], TEMPERATURE)
    finally:
        hook.remove()
    (kwargs, out), = seen
    assert not kwargs.get("output_hidden_states") and out.hidden_states is None


@pytest.mark.parametrize("grad", [False, True])
def test_the_model_projects_no_position_to_the_vocabulary(actor, grad):
    """The model's own output head sees no row (``logits_to_keep`` is an empty index): Archer projects
    the response tokens itself. A ``[B, 1, H]`` last-position projection, unused, was 83% of a
    realistic-shape log-prob pass in bf16 on CPU (benchmarks/RESULTS.md)."""
    rows = []
    hook = actor.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        with torch.set_grad_enabled(grad):
            response_logprobs(actor, _batch()[2], TEMPERATURE)
    finally:
        hook.remove()
    assert rows == [0]
