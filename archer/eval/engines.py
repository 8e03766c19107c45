"""The sampler behind ``archer eval``: vLLM (one engine per GPU) where installed, else HF ``generate``.

Both are the training rollout engines (:mod:`archer.rollout`) started from a saved model folder.
With ``data_parallel_size > 1`` each engine runs in its own spawned process, pinned to one GPU
(``CUDA_VISIBLE_DEVICES``); a call's prompts are split into contiguous parts, one per engine, and
each part keeps the per-prompt seeds it would have had in a single engine (``VLLMEngine`` gives
prompt ``i`` of a call the seed ``seed + i * n``), so the samples do not depend on the number of
engines.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from archer.rollout import Completion, HFEngine, SamplingConfig, VLLMEngine

__all__ = ["Sampler", "resolve_engine", "build_sampler"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Sampler(Protocol):
    """Prompts (token ids) in, ``sampling.n`` completions per prompt out."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def resolve_engine(engine: str) -> str:
    """``hf`` or ``vllm`` for ``auto`` / ``hf`` / ``vllm`` (``auto``: vLLM if it is installed)."""
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return engine


class _HFSampler:
    """HF ``generate`` on the model loaded from the folder (GPU 0 when there is one)."""

    def __init__(self, model_dir: str, tokenizer: Any, dtype: str, batch_size: int | None) -> None:
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = _DTYPES.get(dtype, torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
        self.engine = HFEngine(batch_size=batch_size)
        self.engine.setup(model, tokenizer, model_dir)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        return self.engine.generate(prompt_token_ids, sampling)

    def close(self) -> None:
        self.engine.actor = None


def _start_vllm(model_dir: str, dtype: str, engine_kwargs: dict[str, Any]) -> VLLMEngine:
    from transformers import AutoTokenizer

    engine = VLLMEngine(dtype=dtype, **engine_kwargs)
    engine.setup(None, AutoTokenizer.from_pretrained(model_dir), model_dir)
    return engine


class _VLLMSampler:
    """One vLLM engine in this process."""

    def __init__(self, model_dir: str, dtype: str, engine_kwargs: dict[str, Any]) -> None:
        self.engine = _start_vllm(model_dir, dtype, engine_kwargs)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        return self.engine.generate(prompt_token_ids, sampling)

    def close(self) -> None:
        self.engine.llm = None


def _visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def _vllm_worker(gpu: str | None, model_dir: str, dtype: str, engine_kwargs: dict[str, Any], connection: Any) -> None:
    """A data-parallel engine process: pinned to ``gpu`` (before anything touches CUDA), it answers
    ``(prompts, sampling)`` requests until it receives None."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    engine = _start_vllm(model_dir, dtype, engine_kwargs)
    connection.send("ready")
    while (request := connection.recv()) is not None:
        connection.send(engine.generate(*request))


class _DataParallelVLLMSampler:
    """``size`` vLLM engines in spawned processes, one GPU each."""

    def __init__(self, size: int, model_dir: str, dtype: str, engine_kwargs: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        gpus = _visible_gpus()
        if gpus and len(gpus) < size:
            raise ValueError(f"data_parallel_size={size} but only {len(gpus)} GPUs are visible")
        self.connections, self.processes = [], []
        for rank in range(size):
            parent, child = context.Pipe()
            gpu = gpus[rank] if gpus else None  # CPU: every engine shares the cores
            process = context.Process(target=_vllm_worker, args=(gpu, model_dir, dtype, engine_kwargs, child), daemon=True)
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)
        for rank, connection in enumerate(self.connections):
            if connection.recv() != "ready":
                raise RuntimeError(f"vLLM data-parallel engine {rank} failed to start")

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        size = len(self.connections)
        bounds = [len(prompt_token_ids) * rank // size for rank in range(size + 1)]
        busy = []
        for rank, connection in enumerate(self.connections):
            start, stop = bounds[rank], bounds[rank + 1]
            if start == stop:
                continue
            # Offset the seed so prompt `start + i` gets the seed a single engine would give it.
            seed = None if sampling.seed is None else sampling.seed + start * sampling.n
            connection.send((prompt_token_ids[start:stop], replace(sampling, seed=seed)))
            busy.append(connection)
        return [group for connection in busy for group in connection.recv()]

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes):
            connection.send(None)
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        self.connections, self.processes = [], []


def build_sampler(
    engine: str,
    model_dir: str | Path,
    tokenizer: Any,
    *,
    dtype: str = "auto",
    hf_batch_size: int | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    data_parallel_size: int | None = None,
) -> Sampler:
    """Start the sampler for ``engine`` (``hf`` or ``vllm``) on the model in ``model_dir``."""
    model_dir = str(model_dir)
    if engine == "hf":
        return _HFSampler(model_dir, tokenizer, dtype, hf_batch_size)
    size = data_parallel_size or max(1, torch.cuda.device_count())
    if size == 1:
        return _VLLMSampler(model_dir, dtype, dict(vllm_kwargs or {}))
    return _DataParallelVLLMSampler(size, model_dir, dtype, dict(vllm_kwargs or {}))
