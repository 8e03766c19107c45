"""The rollout protocol: prompts in, ``n`` sampled completions per prompt out.

An engine is anything with ``setup``, ``generate`` and ``load_weights``. Optional members:

* the class attribute ``logprobs_match_trainer`` (default False) says that its log-probs are the
  trainer's own, so no rollout correction is needed;
* ``version`` (an engine that holds its own copy of the weights): the number of ``load_weights``
  calls since ``setup``; its completions then carry the version that sampled them, which the
  trainer checks (:mod:`archer.weight_check`);
* the class attribute ``serves_during_sync`` (default False): ``generate`` may run on another thread
  while ``load_weights`` runs, each sample reporting its version — what asynchronous rollouts need
  (``RemoteVLLMEngine``);
* ``endpoint``: what a rollout waits on (servers' URLs, worker pids), named in the watchdog's
  messages (:mod:`archer.watchdog`);
* ``close()`` releases what the engine holds (a loaded model, vLLM's engine, worker processes,
  servers); the engine is not used after it. Callers that are done with an engine call it where
  it exists (``getattr(engine, "close", None)``). It is left out of :class:`RolloutEngine` so that
  an engine without it still satisfies the protocol (YAML ``class_path`` checks it).

``HFEngine`` samples with the live actor (``transformers.generate``), or with a model it loads
from the folder when there is no actor (``archer eval``); ``VLLMEngine`` runs vLLM's offline engine
in the process and receives the actor's weights in place after each optimizer step;
``DataParallelVLLMEngine`` splits each call over several ``VLLMEngine`` processes (one GPU each; it
serves a saved folder and takes no weights); ``RemoteVLLMEngine`` samples from vLLM servers over
HTTP and pushes the weights to them. Training and ``archer eval`` generate through the same
engines. Users plug their own engine with ``model.rollout.class_path`` in YAML.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class SamplingConfig:
    """How rollouts are sampled."""

    n: int = 8
    """Completions per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; the loss recomputes log-probs and entropy at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k cutoff; -1 disables it."""
    max_new_tokens: int = 64
    """Maximum response length in tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a response (the tokenizer's EOS always does)."""
    seed: int | None = None
    """Base seed for sampling; None draws from the global generator."""


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]
    """Response tokens, including the EOS/stop token when it finished with one."""
    logprobs: list[float] | None
    """Engine's log-prob of each sampled token at the sampling temperature (None if not given)."""
    finish_reason: FinishReason
    """``stop`` (EOS/stop token) or ``length`` (hit ``max_new_tokens``)."""
    weight_version: int | None = None
    """The oldest weight version that sampled any of its tokens (the number of ``load_weights``
    calls the engine had completed when those weights went in; ``-1``: the server's checkpoint
    after a failed sync was rolled back). None: the engine does not track versions (it samples
    with the live actor, which is always current)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Prompts (token ids) in, ``n`` completions per prompt out."""

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Bind the engine to the training actor; called once, after the actor exists. ``actor`` is
        None when there is no live model (evaluating a saved folder): the engine loads ``model_path``."""

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        """Return, for each prompt, ``sampling.n`` completions (outer list aligned with prompts)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with the actor's (a no-op for engines that
        sample with the actor itself)."""
