"""``HFEngine``: rollouts sampled with the live training actor through ``transformers.generate``.

The CPU default: no second copy of the weights exists, so ``load_weights`` is a no-op and the
samples always come from the current policy. Without an actor (``archer eval`` of a saved folder)
``setup`` loads the model from ``model_path`` itself.

Log-probabilities. For a response position with logits ``x`` (``[V]``), sampling temperature
``τ > 0`` and sampled token ``y``, the engine returns::

    ℓ = log_softmax(warp(x / τ))_y

where ``warp`` sets the logits outside the top-k / top-p set to −∞ (the distribution the token was
actually drawn from). With ``top_k = -1`` and ``top_p = 1`` there is no warping and ℓ equals the
actor's recomputed ``log_softmax(x / τ)_y``, so ``rollout/logprob_diff`` measures only numerical
differences (padding, batch shape). At ``τ = 0`` (greedy) no temperature is applied: ℓ is
``log_softmax(x)_y``, as vLLM does.

Shared prompts: the ``n`` samples of a prompt are ``n`` rows of the batch with the same prompt, so
the prompt is prefilled once and its KV cache copied to the rows (:meth:`HFEngine._shared_prefix_cache`).

Progress: every generated token reports progress to the run's watchdog
(:func:`archer.watchdog.progress`), which ends a generation that stalls (``model.watchdog.stall_s``).
The samples come from the live actor, so they carry no weight version: they are always current.

Sharded actors. Under FSDP2 (``fully_shard``) ``generate`` works unchanged — each forward
all-gathers the parameters of one layer at a time — but every rank must run the same number of
forward passes, so ``synced_gpus=True`` is passed whenever parameters are DTensors (ranks that
finish early keep stepping until all have). Every rank must then also call ``generate`` with the
same number of ``batch_size`` chunks (i.e. the same number of prompts).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache

from archer import watchdog
from archer.models import DTYPES
from archer.rollout.base import Completion, SamplingConfig

__all__ = ["HFEngine"]



class HFEngine:
    """Samples rollouts with the training actor itself (``transformers.generate``).

    Args:
        batch_size: Sequences (prompt × sample) generated per ``generate`` call; None does all at
            once. ``output_scores`` keeps one ``[batch, vocab]`` float32 tensor per generated
            token, so this bounds that memory: ``batch_size × max_new_tokens × vocab × 4`` bytes.
        dtype: Weight dtype of the model ``setup`` loads when it is given no actor (``auto``:
            bfloat16 on GPU, float32 on CPU); unused with a live actor.
    """

    logprobs_match_trainer = True
    """The samples come from the actor itself: its log-probs are the trainer's (no correction needed)."""

    endpoint = "transformers.generate on the actor"
    """What a rollout waits on, in the watchdog's messages."""

    def __init__(
        self, batch_size: int | None = None, dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"HFEngine batch_size must be >= 1 or None, got {batch_size}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"HFEngine dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        self.batch_size = batch_size
        self.dtype = dtype
        self.actor: nn.Module | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int | None = None

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Bind to the actor; with ``actor=None``, load the model from ``model_path`` (on GPU 0 when
        there is one, in ``dtype``) and sample with it."""
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer from {model_path!r} has no eos_token_id; HFEngine needs one to stop")
        if actor is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = DTYPES.get(self.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
            actor = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        self.actor = actor
        self.eos_token_id = tokenizer.eos_token_id
        # Left padding only needs some id the attention mask hides; EOS serves if there is no pad.
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """No-op: the engine samples with the actor's own parameters."""

    def close(self) -> None:
        """Drop the model (the one ``setup`` loaded is then freed; a live actor is only unbound)."""
        self.actor = None

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (outer list aligned with the prompts)."""
        if self.actor is None:
            raise RuntimeError("HFEngine.generate called before setup(actor, tokenizer, model_path)")
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        # n samples of one prompt are n rows of the batch, adjacent so they regroup by slicing.
        rows = [prompt for prompt in prompt_token_ids for _ in range(sampling.n)]
        chunk = self.batch_size or max(len(rows), 1)
        was_training, checkpoint_generation_config = self.actor.training, self.actor.generation_config
        self.actor.eval()
        # transformers fills every field our config leaves unset from ``model.generation_config``
        # (released checkpoints ship e.g. top_k=20, top_p=0.95, repetition_penalty=1.05), which
        # would make the sampling distribution differ from the log_softmax(logits / τ) the loss
        # assumes: generate against a blank one.
        self.actor.generation_config = GenerationConfig()
        try:
            with self._seeded(sampling.seed):
                flat = [
                    completion
                    for start in range(0, len(rows), chunk)
                    for completion in self._generate_rows(rows[start : start + chunk], sampling)
                ]
        finally:
            self.actor.train(was_training)
            self.actor.generation_config = checkpoint_generation_config
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompt_token_ids))]

    def _seeded(self, seed: int | None) -> contextlib.AbstractContextManager:
        """Seed sampling without disturbing the global RNG streams the training loop uses."""
        if seed is None:
            return contextlib.nullcontext()
        device = next(self.actor.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []

        @contextlib.contextmanager
        def forked() -> Iterator[None]:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                yield

        return forked()

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        """Plain temperature / top-k / top-p sampling (or greedy) that stops at EOS or a stop token."""
        greedy = sampling.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or sampling.top_k < 0 else sampling.top_k,  # 0 disables HF's top-k
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=[self.eos_token_id, *sampling.stop_token_ids],
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )

    @torch.no_grad()
    def _generate_rows(self, rows: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        device = next(self.actor.parameters()).device
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, device=device)
            attention_mask[i, width - len(row) :] = 1
        sharded = any(isinstance(p, DTensor) for p in self.actor.parameters())
        # Sharded: every rank must run the same forwards, and whether a prefix pass runs depends on its rows.
        prefix = None if sharded else self._shared_prefix_cache(rows, input_ids, attention_mask)
        out = self.actor.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(sampling),
            synced_gpus=sharded,
            stopping_criteria=StoppingCriteriaList([_ReportProgress()]),
            **({} if prefix is None else {"past_key_values": prefix}),
        )
        new_tokens = out.sequences[:, width:]  # [B, T_gen]
        # scores[t] are the processed (temperature-scaled, top-k/top-p masked) logits of step t.
        logprobs = torch.stack(
            [
                torch.log_softmax(step_scores, dim=-1).gather(-1, new_tokens[:, t : t + 1]).squeeze(-1)
                for t, step_scores in enumerate(out.scores)
            ],
            dim=1,
        )  # [B, T_gen]
        stop_ids = {self.eos_token_id, *sampling.stop_token_ids}
        completions = []
        for tokens, token_logprobs in zip(new_tokens.tolist(), logprobs.tolist()):
            # After a row stops, HF keeps padding it until the whole batch stops: cut there.
            end = next((t + 1 for t, tok in enumerate(tokens) if tok in stop_ids), None)
            finish = "stop" if end is not None else "length"
            end = end if end is not None else len(tokens)
            completions.append(Completion(token_ids=tokens[:end], logprobs=token_logprobs[:end], finish_reason=finish))
        return completions

    def _shared_prefix_cache(self, rows: list[list[int]], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> Cache | None:
        """The KV cache of the rows' (left-padded) prompts minus their last column, computed once per
        distinct prompt and gathered to every row; None when no prompt repeats (or the prompts are one
        column wide), and ``generate`` runs the whole prefill itself.

        The ``n`` samples of a prompt share its prompt: prefilling it once instead of ``n`` times
        cuts the quickstart's rollout from 0.046 to 0.029 s (``bench_trl.py``, benchmarks/RESULTS.md).
        ``generate`` then runs only the last prompt column and the new tokens. Positions are what
        ``generate`` gives left-padded rows (``cumsum(mask) − 1``), so the cache is the one its own
        prefill would build up to floating-point rounding (a smaller batch, another attention
        shape): the distribution sampled is the same, the tokens are the same unless rounding
        flips a draw (bit-identical on the CPU quickstart; on a GPU in bf16 some draws may differ).
        """
        distinct: dict[tuple[int, ...], int] = {}
        which, first = [], []  # each row's distinct prompt; the first row of each distinct prompt
        for i, row in enumerate(rows):
            which.append(distinct.setdefault(tuple(row), len(distinct)))
            if which[-1] == len(first):
                first.append(i)
        forward = inspect.signature(self.actor.forward).parameters
        if len(first) == len(rows) or input_ids.shape[1] < 2 or not {"past_key_values", "logits_to_keep"} <= forward.keys():
            return None  # nothing shared, nothing to prefill, or not a model whose KV cache we can pass (e.g. Mamba)
        ids, mask = input_ids[first, :-1], attention_mask[first, :-1]
        cache = DynamicCache(config=self.actor.config)
        no_position = torch.empty(0, dtype=torch.long, device=ids.device)  # no logits needed (archer.actor._decoder_hidden)
        inputs = {"input_ids": ids, "attention_mask": mask, "past_key_values": cache, "use_cache": True,
                  "logits_to_keep": no_position}
        if "position_ids" in forward:  # as generate decides
            inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.actor(**inputs)
        if cache.get_seq_length() != ids.shape[1]:  # the model kept its state elsewhere: generate prefills
            return None
        cache.reorder_cache(torch.tensor(which, device=input_ids.device))  # row i gets its prompt's entries
        return cache


class _ReportProgress(StoppingCriteria):
    """Never stops generation; tells the watchdog that a token was generated."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        watchdog.progress()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
