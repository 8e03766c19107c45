"""Rollout engines behind one protocol: prompts (token ids) in, ``n`` completions per prompt out."""

from archer.rollout.base import Completion, FinishReason, RolloutEngine, SamplingConfig
from archer.rollout.data_parallel import DataParallelVLLMEngine
from archer.rollout.hf import HFEngine
from archer.rollout.remote import RemoteServerError, RemoteServerTimeout, RemoteVLLMEngine, WeightSyncError
from archer.rollout.vllm import VLLMEngine, named_full_tensors

__all__ = [
    "Completion",
    "DataParallelVLLMEngine",
    "FinishReason",
    "HFEngine",
    "RemoteServerError",
    "RemoteServerTimeout",
    "RemoteVLLMEngine",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "WeightSyncError",
    "named_full_tensors",
]
