"""The rollout engine behind ``archer eval``, picked by name: the training engines of
:mod:`archer.rollout`, started from a saved model folder (no actor).

``hf``: :class:`~archer.rollout.HFEngine` loads the folder (GPU 0 when there is one). ``vllm``: one
:class:`~archer.rollout.VLLMEngine` in this process, or, with ``data_parallel_size > 1`` (default:
the number of visible GPUs), a :class:`~archer.rollout.DataParallelVLLMEngine` of that many engine
processes, one GPU each; its samples equal a single engine's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from archer.rollout import DataParallelVLLMEngine, HFEngine, VLLMEngine

__all__ = ["resolve_engine", "build_engine"]


def resolve_engine(engine: str) -> str:
    """``hf`` or ``vllm`` for ``auto`` / ``hf`` / ``vllm`` (``auto``: vLLM if it is installed)."""
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return engine


def build_engine(
    engine: str,
    model_dir: str | Path,
    tokenizer: Any,
    *,
    dtype: str = "auto",
    hf_batch_size: int | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    data_parallel_size: int | None = None,
) -> HFEngine | VLLMEngine | DataParallelVLLMEngine:
    """The engine ``engine`` (``hf`` or ``vllm``), set up on the model in ``model_dir``; the caller
    closes it (``close()``)."""
    rollout: HFEngine | VLLMEngine | DataParallelVLLMEngine
    if engine == "hf":
        rollout = HFEngine(batch_size=hf_batch_size, dtype=dtype)  # type: ignore[arg-type]  # EvalConfig's Literal
    else:
        if "dtype" in (vllm_kwargs or {}):
            raise ValueError("the vllm settings hold a dtype: give it as dtype (--dtype) instead")
        engine_args = {"dtype": dtype, **(vllm_kwargs or {})}
        size = data_parallel_size or max(1, torch.cuda.device_count())
        rollout = VLLMEngine(**engine_args) if size == 1 else DataParallelVLLMEngine(size, engine_args)
    rollout.setup(None, tokenizer, str(model_dir))
    return rollout
