"""LoRA actors: the reference as the base model (adapters off), and the merged weights engines load.

A LoRA actor (:func:`archer.models.add_lora`, ``model.lora``) is the Hugging Face model with ``peft``'s
LoRA layers injected in place: each targeted linear layer keeps its frozen weight ``W`` (``…proj.base_layer.weight``)
and gains the trained ``A`` ``[r, in]`` and ``B`` ``[out, r]`` (``…proj.lora_A.default.weight``,
``…proj.lora_B.default.weight``), and computes ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` with the scale ``s``
(``alpha / r``, or ``alpha / √r`` with rsLoRA). Three things follow from that:

- **The reference for free.** With the adapters switched off the model computes ``x·Wᵀ + b``: the base
  model, which is the frozen reference of full fine-tuning (the initial policy; ``B = 0`` at the
  start). :func:`adapters_disabled` switches them off around the reference log-prob passes.
- **Merged weights for engines.** An engine that holds its own copy of the weights (vLLM, in process
  or on servers) loads the base model's Hugging Face names; :func:`merged_named_tensors` yields them
  with ``W' = W + s·B·A`` for every adapted layer (computed in float32, cast to ``W``'s dtype), so
  the engine needs no LoRA support. :class:`MergedWeights` is the same thing in the shape an engine's
  ``setup`` reads an actor (``config``, ``named_parameters``).
- **Small checkpoints.** Only ``A`` and ``B`` are trained: the checkpoint holds them and their AdamW
  state, and the base weights are reloaded from ``model_path`` (``ArcherModule.state_dict``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from archer.rollout import named_full_tensors

__all__ = ["MergedWeights", "adapters_disabled", "engine_tensors", "has_adapters", "merged_named_tensors"]

INSTALL_HINT = 'model.lora needs peft: pip install -e ".[lora]"'


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (added by :func:`archer.models.add_lora`)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` computes as its base model: every LoRA layer's adapter off, and every module
    trained in full beside them (``LoraConfig.modules_to_save``) back to its original.

    peft's switch also freezes the adapters and unfreezes them when switched back on; their
    ``requires_grad`` is kept as it was instead, both inside and after: FSDP2 gives the unsharded
    parameter it builds at a parameter's first use the ``requires_grad`` it has then, for good.
    (transformers' ``enable_adapters`` would also leave the ``modules_to_save`` copies switched off.)
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]

    def switch(enabled: bool) -> None:
        for module in _adapted_modules(model).values():
            module.enable_adapters(enabled)
        for param, flag in flags:
            param.requires_grad_(flag)

    switch(False)
    try:
        yield model
    finally:
        switch(True)


def merged_named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of the base model, with each adapted layer's
    weight merged: ``W' = W + s·B·A`` (float32, then ``W``'s dtype), and each module trained in full
    beside the adapters taken from its trained copy; one at a time, as
    :func:`archer.rollout.named_full_tensors` (FSDP2 shards all-gathered: every rank must iterate).

    The names are the base model's (``…q_proj.weight``, not ``…q_proj.base_layer.weight``); the
    adapters' own parameters are not yielded. Tied parameters come under every name.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    owners = _adapted_modules(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        k = next((k for k in range(len(parts)) if ".".join(parts[:k]) in owners), None)
        if k is None:
            yield name, _full(param)
            continue
        owner = owners[".".join(parts[:k])]
        if isinstance(owner, ModulesToSaveWrapper):  # X.original_module.P, X.modules_to_save.<adapter>.P
            active = "original_module" if owner.disable_adapters else f"modules_to_save.{owner.active_adapters[0]}"
            inner = active.count(".") + 1
            if ".".join(parts[k:k + inner]) == active:
                yield ".".join(parts[:k] + parts[k + inner:]), _full(param)
            continue
        if parts[k] != "base_layer":  # the adapters' A, B
            continue
        if not isinstance(owner, LoraLinear) or any(owner.use_dora.get(a, False) for a in owner.active_adapters):
            raise ValueError(f"{name}: merging is implemented for plain LoRA on linear layers, not {type(owner).__name__}")
        if owner.merged:
            raise ValueError(f"{name}: the adapters are already merged into the base weight (peft merge_adapter)")
        tensor = _full(param)
        if parts[-1] == "weight" and not owner.disable_adapters:
            delta = sum(
                owner.scaling[a] * (_full(owner.lora_B[a].weight).float() @ _full(owner.lora_A[a].weight).float())
                for a in owner.active_adapters
                if a in owner.lora_A
            )
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield ".".join(parts[:k] + parts[k + 1:]), tensor


def _adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules peft put in ``model``, by name: LoRA layers and ``modules_to_save`` wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    kinds = (BaseTunerLayer, ModulesToSaveWrapper)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def engine_tensors(actor: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(hf_name, full tensor)`` pairs an engine loads from ``actor``: its parameters, or with LoRA
    adapters the merged weights (:func:`merged_named_tensors`)."""
    return merged_named_tensors(actor) if has_adapters(actor) else named_full_tensors(actor)


class MergedWeights:
    """A LoRA actor as an engine's ``setup`` reads one: ``config`` and ``named_parameters`` (the
    merged weights under the base model's names, :func:`merged_named_tensors`: computed on every
    call, so every rank must call it under FSDP2). Engines that hold their own weights get this
    instead of the actor; ``HFEngine`` samples with the actor itself."""

    def __init__(self, actor: nn.Module) -> None:
        if not has_adapters(actor):
            raise ValueError(f"{type(actor).__name__} has no LoRA adapters to merge")
        self.actor = actor
        self.config = actor.config

    def named_parameters(self, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged weights; tied ones under every name whatever ``remove_duplicate`` says (as
        :func:`archer.rollout.named_full_tensors` reads them)."""
        return merged_named_tensors(self.actor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
