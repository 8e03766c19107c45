"""Turn prompts and engine completions into the padded tensors the loss consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from archer.rollout.base import Completion


@dataclass
class RolloutBatch:
    """``N`` sequences laid out as ``[left-padded prompt (P) | right-padded response (R)]``.

    Every prompt ends at column ``P - 1`` and every response starts at column ``P``, so the hidden
    state that predicts response token ``t`` is at column ``P - 1 + t`` for all rows at once.
    """

    input_ids: torch.Tensor  # [N, P + R] long
    attention_mask: torch.Tensor  # [N, P + R] long, 1 on prompt and response tokens
    position_ids: torch.Tensor  # [N, P + R] long, counts real tokens only (left padding)
    response_ids: torch.Tensor  # [N, R] long, pad id after the end
    response_mask: torch.Tensor  # [N, R] float, 1 on response tokens incl. EOS
    engine_logprobs: torch.Tensor | None  # [N, R] float, the engine's log-probs of the sampled tokens
    truncated: torch.Tensor  # [N] bool, hit max_new_tokens without EOS
    prompt_len: int  # P

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        """The sub-batch of rows ``index`` (same P and R)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return RolloutBatch(**values)

    def trimmed(self) -> RolloutBatch:
        """The same rows without the columns that are padding in every one of them: prompt columns
        left of the longest prompt, response columns right of the longest response (one kept at
        least). A micro-batch is then padded to its own longest sequence, not the whole batch's."""
        p = int(self.attention_mask[:, : self.prompt_len].sum(-1).max())
        r = max(1, int(self.response_mask.sum(-1).max()))
        columns = slice(self.prompt_len - p, self.prompt_len + r)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask", "position_ids"):
                value = value[:, columns]
            elif isinstance(value, torch.Tensor) and value.dim() == 2:  # response-aligned [N, R]
                value = value[:, :r]
            values[f.name] = value
        values["prompt_len"] = p
        return RolloutBatch(**values)

    def to(self, device: torch.device) -> RolloutBatch:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return RolloutBatch(**values)


def collate_rollout(
    prompt_token_ids: list[list[int]], completions: list[Completion], pad_token_id: int
) -> RolloutBatch:
    """Pad ``N`` (prompt, completion) pairs into a :class:`RolloutBatch`.

    ``prompt_token_ids[i]`` is the prompt of ``completions[i]`` (prompts repeated ``n`` times for a
    group). Empty responses keep one padded column so that ``R >= 1``.
    """
    if len(prompt_token_ids) != len(completions):
        raise ValueError(f"{len(prompt_token_ids)} prompts for {len(completions)} completions")
    n = len(completions)
    p = max(len(ids) for ids in prompt_token_ids)
    r = max(1, max(len(c.token_ids) for c in completions))
    input_ids = torch.full((n, p + r), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, p + r), dtype=torch.long)
    response_mask = torch.zeros((n, r), dtype=torch.float32)
    has_logprobs = all(c.logprobs is not None for c in completions)
    engine_logprobs = torch.zeros((n, r), dtype=torch.float32) if has_logprobs else None
    for i, (prompt, completion) in enumerate(zip(prompt_token_ids, completions)):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, p - len(prompt) : p] = 1
        length = len(completion.token_ids)
        if length:
            input_ids[i, p : p + length] = torch.tensor(completion.token_ids, dtype=torch.long)
            attention_mask[i, p : p + length] = 1
            response_mask[i, :length] = 1.0
            if engine_logprobs is not None:
                engine_logprobs[i, :length] = torch.tensor(completion.logprobs, dtype=torch.float32)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    truncated = torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.bool)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_ids=input_ids[:, p:].clone(),
        response_mask=response_mask,
        engine_logprobs=engine_logprobs,
        truncated=truncated,
        prompt_len=p,
    )
