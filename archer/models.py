"""Loading the actor and the reference from a Hugging Face folder, and sharding them with FSDP2.

Kept apart from the :class:`~archer.actor.Actor`, which computes with whatever model it is handed:
how a model comes to exist (dtype, attention kernel, gradient checkpointing, FSDP2) is a question of
the run's configuration, answered once in ``ArcherModule.configure_model``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

__all__ = ["DTYPES", "fully_shard_decoder", "load_causal_lm", "runs_packed"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names a config may give."""


def load_causal_lm(path: str, dtype: str, *, attn_implementation: str | None = None, trainable: bool = True,
                   gradient_checkpointing: bool = False) -> nn.Module:
    """A causal LM from ``path`` in ``dtype``: trainable (the actor: no KV cache, optional gradient
    checkpointing), or frozen in eval mode (the reference)."""
    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kernel)
    if not trainable:
        return model.eval().requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def runs_packed(model: nn.Module, packing: str) -> bool:
    """Whether micro-batches run packed (``update.packing``): ``on``, or ``auto`` with a varlen or
    flex attention kernel, whose cost stays per sequence (``UpdateConfig.packing``)."""
    implementation = str(model.config._attn_implementation)
    return packing == "on" or (
        packing == "auto" and ("flash_attention" in implementation or implementation == "flex_attention")
    )


def fully_shard_decoder(model: nn.Module, mesh, compute_dtype: str | None) -> None:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, head). With
    ``compute_dtype``, forward and backward run in it while parameters and gradient reduction stay in
    float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` to shard")
    policy = MixedPrecisionPolicy()
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[compute_dtype], reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
