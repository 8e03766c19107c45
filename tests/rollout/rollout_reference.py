"""Reference computations the engine tests compare against."""

from __future__ import annotations

import torch
from torch import nn

from archer.rollout import HFEngine
from archer.tiny import build_tokenizer


@torch.no_grad()
def actor_token_logprobs(actor: nn.Module, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """float64 ``log_softmax(logits / τ)`` of each response token, from one unpadded forward pass.

    The logits at position ``t`` predict token ``t + 1``, so response token ``j`` (at position
    ``len(prompt) + j``) is scored by the logits at position ``len(prompt) + j - 1``.
    """
    ids = torch.tensor([prompt + response])
    logits = actor(ids).logits[0, len(prompt) - 1 : -1].double()  # [len(response), V]
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def max_logprob_gap(actor: nn.Module, prompts: list[list[int]], out, temperature: float) -> float:
    """max over prompts, samples and tokens of |engine log-prob − actor float64 log-prob|."""
    gaps = []
    for prompt, group in zip(prompts, out):
        for c in group:
            reference = actor_token_logprobs(actor, prompt, c.token_ids, temperature)
            gaps.append((torch.tensor(c.logprobs, dtype=torch.float64) - reference).abs().max().item())
    return max(gaps)


def hf_greedy(actor: nn.Module, prompts: list[list[int]], greedy) -> list[list[int]]:
    """The token ids HF ``generate`` picks greedily for each prompt: what a synced engine must give."""
    hf = HFEngine()
    hf.setup(actor, build_tokenizer(), "")
    return [g[0].token_ids for g in hf.generate(prompts, greedy)]
