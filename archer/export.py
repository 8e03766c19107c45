"""``archer export CKPT OUT_DIR``: a Lightning checkpoint's actor → a Hugging Face model folder.

The module stores the trained policy as ``self.actor`` (a ``transformers`` causal LM), so the
checkpoint's ``state_dict`` holds its weights under ``actor.<HF parameter name>``; other prefixes
(``reference.``, ...) are ignored. ``hyper_parameters["model_path"]`` is the HF folder the actor
was loaded from: config, tokenizer and generation config are copied from it. The output is a
``save_pretrained`` folder (safetensors) that ``AutoModelForCausalLM.from_pretrained`` and vLLM
load. Weights keep the dtype they were trained in.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

__all__ = ["ACTOR_PREFIX", "export_checkpoint", "actor_state_dict"]

ACTOR_PREFIX = "actor."


def actor_state_dict(state_dict: dict[str, torch.Tensor], ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The ``actor.``-prefixed entries of a module state dict, with the prefix removed."""
    actor = {key[len(ACTOR_PREFIX):]: value for key, value in state_dict.items() if key.startswith(ACTOR_PREFIX)}
    if not actor:
        prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
        raise KeyError(f"{ckpt_path}: no '{ACTOR_PREFIX}*' weights in state_dict (top-level prefixes: {prefixes})")
    return actor


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's actor as a HF ``save_pretrained`` folder; return ``out_dir``.

    Args:
        ckpt_path: a single-file Lightning checkpoint (``Trainer.save_checkpoint`` /
            ``ModelCheckpoint``) of the Archer module.
        out_dir: the folder to write (created; existing files of the same name are overwritten).
    """
    ckpt_file = Path(ckpt_path)
    if not ckpt_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_file} is not a file (a sharded/distributed checkpoint folder must first be "
            "consolidated with `python -m lightning.pytorch.utilities.consolidate_checkpoint`)"
        )
    # weights_only=False: Lightning checkpoints pickle hyper-parameters (dataclasses, paths). Only
    # export checkpoints you trust, as with any pickle.
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    for key in ("state_dict", "hyper_parameters"):
        if key not in checkpoint:
            raise KeyError(f"{ckpt_file}: not a Lightning module checkpoint, no {key!r} entry")
    model_path = checkpoint["hyper_parameters"].get("model_path")
    if model_path is None:
        raise KeyError(f"{ckpt_file}: hyper_parameters has no 'model_path' (the HF folder the actor was loaded from)")
    model_dir = Path(model_path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt_file}: hyper_parameters.model_path = {model_dir} has no config.json (moved or deleted?); "
            "the export copies config and tokenizer from it"
        )
    weights = actor_state_dict(checkpoint["state_dict"], ckpt_file)

    config = AutoConfig.from_pretrained(model_dir)
    # Built in the trained dtype, so the saved weights are bit-identical to the checkpoint's.
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
    weights = _complete_tied(weights, model, ckpt_file)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise KeyError(f"{ckpt_file}: actor weights do not match the architecture in {model_dir}: {error}") from error

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _complete_tied(
    weights: dict[str, torch.Tensor], model: torch.nn.Module, ckpt_file: Path
) -> dict[str, torch.Tensor]:
    """Check and fill parameters the model ties together (``lm_head.weight`` ≡ embedding when tied).

    Loading two different tensors into one tied parameter would silently keep the last one, so
    tied names present in the checkpoint must be equal; tied names it lacks get their partner.
    """
    tied_groups: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict().items():
        tied_groups[tensor.data_ptr()].append(name)
    completed = dict(weights)
    for names in tied_groups.values():
        present = [name for name in names if name in weights]
        if len(names) < 2 or not present:
            continue
        for name in present[1:]:
            if not torch.equal(weights[name], weights[present[0]]):
                raise ValueError(
                    f"{ckpt_file}: {name} and {present[0]} are tied in the model config but differ in the checkpoint"
                )
        for name in names:
            completed.setdefault(name, weights[present[0]])
    return completed
