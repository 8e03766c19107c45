"""The trainer's log-prob forward (``ArcherModule._logprobs``), padded and packed, against a brute-force
reference: each sequence alone through the model, full-vocabulary ``log_softmax(logits / T)``."""

import pytest
import torch

from archer.losses import DAPOLoss
from archer.module import ArcherModule
from archer.rollout.base import Completion
from archer.rollout.batch import collate_rollout

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def module(tiny_model_dir):
    module = ArcherModule(tiny_model_dir, loss=DAPOLoss())
    module.configure_model()
    return module


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
def test_logprobs_and_entropies_match_each_sequence_alone(module, packed):
    prompts, responses, batch = _batch()
    module.packed = packed
    try:
        logprob, entropy = module._logprobs(module.actor, batch, TEMPERATURE)
    finally:
        module.packed = False
    for i, (ref_logprob, ref_entropy) in enumerate(_reference(module.actor, prompts, responses)):
        n = len(responses[i])
        torch.testing.assert_close(logprob[i, :n].double(), ref_logprob, rtol=0, atol=2e-5)
        torch.testing.assert_close(entropy[i, :n].double(), ref_entropy, rtol=0, atol=2e-5)
        assert (logprob[i, n:] == 0).all() and (entropy[i, n:] == 0).all()  # nothing past the response


def test_packed_and_padded_give_the_same_gradients(module):
    _, _, batch = _batch()
    grads = []
    for packed in (False, True):
        module.packed = packed
        module.actor.zero_grad()
        module._logprobs(module.actor, batch, TEMPERATURE)[0].sum().backward()
        grads.append({name: p.grad.clone() for name, p in module.actor.named_parameters()})
    module.packed = False
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_forward_keeps_only_the_last_hidden_state(module):
    """The decoder is asked for its last hidden state only: no per-layer outputs are kept alive, and the
    vocabulary projection runs on the response tokens only (not on logits for every position)."""
    seen = []
    hook = module.actor.get_decoder().register_forward_hook(lambda mod, args, kwargs, out: seen.append((kwargs, out)),
                                                              with_kwargs=True)
    try:
        module._logprobs(module.actor, _batch()[2], TEMPERATURE)
    finally:
        hook.remove()
    (kwargs, out), = seen
    assert not kwargs.get("output_hidden_states") and out.hidden_states is None
