"""Rollout engines behind one protocol: prompts (token ids) in, ``n`` completions per prompt out."""

from archer.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig
from archer.rollout.hf import HFEngine
from archer.rollout.vllm import VLLMEngine, named_full_tensors

__all__ = [
    "Completion",
    "FinishReason",
    "HFEngine",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "named_full_tensors",
]
