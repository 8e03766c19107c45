"""Sampling over vLLM's token-in/token-out route: the request of one prompt, the completions of its answer.

Each prompt is one ``POST /inference/v1/generate`` (token ids in, token ids out) with ``n``
samples, ``logprobs=0`` (the sampled token's log-prob) and seed ``seed + i·n`` for prompt ``i`` (as
:class:`~archer.rollout.VLLMEngine`). The servers run with ``--logprobs-mode processed_logprobs``,
so a log-prob is ``log_softmax(logits / T)`` at the sampled token (after top-k/top-p), the scale
the trainer recomputes: these are the behaviour policy's log-probs μ. vLLM reports, per output
token span, the weight version that sampled it; :attr:`Completion.weight_version` is the oldest of
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from archer.rollout.base import Completion, SamplingConfig
from archer.rollout.remote.client import RemoteServerError

__all__ = ["completions", "generate_bodies"]


def generate_bodies(prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[dict[str, Any]]:
    """The ``/inference/v1/generate`` request body of each prompt."""
    params: dict[str, Any] = dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(sampling.top_k, 0),  # vLLM: 0 disables
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        min_p=0.0,
    )
    bodies = []
    for i, prompt in enumerate(prompt_token_ids):
        # vLLM gives sample j of a request the seed ``seed + j``: spacing requests by n keeps every
        # sample's stream distinct, and the result does not depend on which server served it.
        seed = {} if sampling.seed is None else {"seed": sampling.seed + i * sampling.n}
        bodies.append({"token_ids": [int(t) for t in prompt], "sampling_params": {**params, **seed}, "output_mode": "tokens"})
    return bodies


def completions(response: Mapping[str, Any], n: int, url: str) -> list[Completion]:
    """The ``n`` completions of the answer of server ``url``, in sample order."""
    choices = sorted(response.get("choices") or [], key=lambda c: c["index"])
    if len(choices) != n:
        raise RemoteServerError(url, f"returned {len(choices)} completions for n={n}")
    return [_to_completion(choice, url) for choice in choices]


def _parse_version(label: Any) -> int | None:
    try:
        return int(label)
    except (TypeError, ValueError):
        return None  # e.g. "default": a server nobody has labelled


def _to_completion(choice: Mapping[str, Any], url: str) -> Completion:
    """One ``/inference/v1/generate`` choice → :class:`Completion`."""
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RemoteServerError(url, f"finished a completion with reason {reason!r} (expected stop/length)")
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    content = (choice.get("logprobs") or {}).get("content") or []
    if [entry["token_id"] for entry in content] != token_ids:
        raise RemoteServerError(url, "returned log-probs that do not line up with the sampled tokens")
    versions = [_parse_version(span.get("version")) for span in choice.get("weight_versions") or []]
    weight_version = min(versions) if versions and None not in versions else None  # type: ignore[type-var]
    return Completion(
        token_ids=token_ids,
        logprobs=[float(entry["logprob"]) for entry in content],
        finish_reason=reason,
        weight_version=weight_version,
    )
