"""Loading the actor and the reference from a Hugging Face folder, and sharding them with FSDP2.

Kept apart from the :class:`~archer.actor.Actor`, which computes with whatever model it is handed:
how a model comes to exist (dtype, attention kernel, gradient checkpointing, FSDP2) is a question of
the run's configuration, answered once in ``ArcherModule.configure_model``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from archer.config import LoraConfig

__all__ = ["DTYPES", "load_actor_and_reference", "add_lora", "fully_shard_decoder", "load_causal_lm", "runs_packed"]

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


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (``peft``, through transformers' adapter support:
    the model keeps its class, its methods and its parameter names, the adapted layers' weights
    moving to ``…proj.base_layer.weight``) and freeze everything but the adapters; returns ``model``.

    ``config`` maps onto ``peft.LoraConfig``: ``r``, ``lora_alpha = alpha``, ``lora_dropout = dropout``,
    ``target_modules``, ``init_lora_weights`` (True for ``default``), ``use_rslora = rslora``,
    ``modules_to_save``, no bias.
    The adapters are float32 whatever the model's dtype: a small learning rate's steps are below
    bfloat16's resolution (peft's layers cast their input to the adapters' dtype and back).
    """
    try:
        import peft
    except ImportError as err:
        from archer.lora import INSTALL_HINT

        raise ImportError(INSTALL_HINT) from err
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        init_lora_weights=True if config.init == "default" else config.init, use_rslora=config.rslora, bias="none",
        modules_to_save=list(config.modules_to_save) or None,
    )
    try:
        model.add_adapter(peft_config)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora: {err}") from err
    from peft.tuners.lora import Linear
    from peft.utils import ModulesToSaveWrapper

    from archer.lora import _adapted_modules

    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    for name, module in _adapted_modules(model).items():
        if getattr(module, "fan_in_fan_out", False):  # Conv1D layers (GPT-2): the merge for engines assumes W [out, in]
            raise ValueError(f"model.lora adapts {name}, a Conv1D-style layer (fan_in_fan_out): not supported")
        if isinstance(module, ModulesToSaveWrapper) and next(model.parameters()).dtype != torch.float32:
            raise ValueError(
                f"model.lora.modules_to_save ({name}) needs model.dtype: float32: the trained copies are kept in "
                "float32 and would feed float32 activations into the model's other layers"
            )
        if any(module is e for e in embeddings) or not isinstance(module, (Linear, ModulesToSaveWrapper)):
            raise ValueError(
                f"model.lora (target_modules = {config.target_modules!r}, modules_to_save = {config.modules_to_save!r}) "
                f"adapts {name}: only the decoder's linear layers take adapters, and only its other modules (norms) are "
                "trained beside them (the trainer computes log-probs from the output head's weight itself)"
            )
    for param in model.parameters():
        if param.requires_grad:  # float32 adapters on a bfloat16 base (peft's autocast_adapter_dtype)
            param.data = param.data.float()
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


def load_actor_and_reference(
    path: str, dtype: str, *, lora=None, needs_reference: bool, attn_implementation: str | None = None,
    gradient_checkpointing: bool = False, mesh=None, compute_dtype: str | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """The actor (trainable; with ``lora``, frozen under trainable adapters) and the reference (frozen;
    only when ``needs_reference`` and it is not the LoRA actor with its adapters off, ``lora.reference``),
    both FSDP2-sharded over the data-parallel ``mesh`` when one is given."""
    actor = load_causal_lm(path, dtype, attn_implementation=attn_implementation,
                           gradient_checkpointing=gradient_checkpointing)
    if lora is not None:
        add_lora(actor, lora)
    reference = None
    if needs_reference and (lora is None or lora.reference == "copy"):
        reference = load_causal_lm(path, dtype, attn_implementation=attn_implementation, trainable=False)
    if mesh is not None:
        for model in (actor, reference):
            if model is not None:
                fully_shard_decoder(model, mesh, compute_dtype)
    return actor, reference
