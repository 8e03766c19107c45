"""Reference computations the engine tests compare against."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def actor_token_logprobs(actor: nn.Module, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """float64 ``log_softmax(logits / τ)`` of each response token, from one unpadded forward pass.

    The logits at position ``t`` predict token ``t + 1``, so response token ``j`` (at position
    ``len(prompt) + j``) is scored by the logits at position ``len(prompt) + j - 1``.
    """
    ids = torch.tensor([prompt + response])
    logits = actor(ids).logits[0, len(prompt) - 1 : -1].double()  # [len(response), V]
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
