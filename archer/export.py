"""``archer export CKPT OUT_DIR``: a Lightning checkpoint's actor → a Hugging Face model folder.

CKPT is either form in which Lightning saves the Archer module:

* a file (``Trainer.save_checkpoint`` / ``ModelCheckpoint`` on one device or under DDP): one
  ``torch.save`` dict with ``state_dict``, ``hyper_parameters``, optimizer and loop state;
* a folder, what ``ModelParallelStrategy`` (FSDP2, the shipped GPU configs) saves by default
  (``save_distributed_checkpoint=True``): every rank writes its shards with
  ``torch.distributed.checkpoint`` (DCP: ``.metadata`` + ``*.distcp`` files, the module state
  under ``state_dict``, optimizer states under ``optimizer_<i>``), and rank 0 writes the remaining
  entries (``hyper_parameters``, loop state, ...) to ``meta.pt``. Of such a folder only the actor's
  tensors (full size: one copy of the policy in host memory, no reference model, no optimizer
  state) and ``meta.pt`` are read. Lightning's ``consolidate_checkpoint`` utility expects FSDP1's
  layout (a ``model`` entry) and fails on these folders, and torch's ``dcp_to_torch_save`` drops
  ``meta.pt`` (so the ``model_path`` below): neither is needed.

:func:`load_checkpoint` reads both forms; :func:`export_checkpoint` (and ``archer eval``, which
exports a checkpoint to ``OUT/model`` first) goes through it.

The module stores the trained policy as ``self.actor`` (a ``transformers`` causal LM), so the
checkpoint's ``state_dict`` holds its weights under ``actor.<HF parameter name>``; other prefixes
(``reference.``, ...) are ignored. ``hyper_parameters["model_path"]`` is the HF folder the actor
was loaded from: config, tokenizer and generation config are copied from it. The output is a
``save_pretrained`` folder (safetensors) that ``AutoModelForCausalLM.from_pretrained`` and vLLM
load. Weights keep the dtype they were trained in.

A LoRA run's checkpoint (``model.lora``) holds only the adapters under ``actor.``: the base weights
come from ``model_path`` and the adapters are merged into them (``W + s·B·A``), or with
``--adapter-only`` written as a peft adapter folder; ``archer export ADAPTER_DIR OUT`` merges such a
folder onto its base model (``docs/lora.md``).

Both forms hold pickles (``torch.load(weights_only=False)``: Lightning pickles hyper-parameters,
dataclasses, paths): only export checkpoints you trust.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from archer.config import LoraConfig
from archer.lora import merged_named_tensors
from archer.models import DTYPES, add_lora

__all__ = ["ACTOR_PREFIX", "export_checkpoint", "load_checkpoint", "is_distributed_checkpoint", "actor_state_dict"]

ACTOR_PREFIX = "actor."
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a peft adapter
_DCP_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``torch.distributed.checkpoint``."""
    return (Path(path) / _DCP_METADATA).is_file()


def load_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``ckpt_path`` as one dict, ``{"state_dict": ..., "hyper_parameters": ..., ...}``.

    Args:
        ckpt_path: a single-file Lightning checkpoint, or a sharded (FSDP2 / DCP) checkpoint folder.
            From a folder, ``state_dict`` holds only the actor's (``actor.*``) tensors, consolidated to
            full size, and the other entries are those of its ``meta.pt``.
    """
    path = Path(ckpt_path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if is_distributed_checkpoint(path):
        return _load_distributed_actor(path)
    raise FileNotFoundError(
        f"checkpoint {path} is neither a file nor a sharded (FSDP2) checkpoint folder "
        f"({'no ' + _DCP_METADATA + ' in it' if path.is_dir() else 'it does not exist'})"
    )


def _load_distributed_actor(folder: Path) -> dict[str, Any]:
    """``{**meta.pt, "state_dict": actor.* tensors}`` of the DCP folder ``folder``."""
    import torch.distributed.checkpoint as dcp

    meta_file = folder / _LIGHTNING_META
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder}: a torch.distributed checkpoint without Lightning's {_LIGHTNING_META} (hyper_parameters, "
            "so the model_path the export needs); not a checkpoint saved by the Archer module's Trainer"
        )
    reader = dcp.FileSystemReader(folder)
    metadata = reader.read_metadata()
    # DCP flattens nested dicts; planner_data maps each flat key back to its path, here
    # ("state_dict", "actor.model....") — Lightning's keys contain dots, so the path is the truth.
    paths = metadata.planner_data or {}
    request: dict[str, torch.Tensor] = {}
    prefixes: set[str] = set()
    for key, entry in metadata.state_dict_metadata.items():
        path = paths.get(key, tuple(key.split(".", 1)))
        if len(path) != 2 or path[0] != "state_dict":
            continue
        name = str(path[1])
        prefixes.add(name.split(".", 1)[0])
        if not name.startswith(ACTOR_PREFIX):
            continue
        if not hasattr(entry, "size"):
            raise ValueError(f"{folder}: {name} is not a tensor in the checkpoint")
        request[name] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not request:
        raise KeyError(f"{folder}: no 'state_dict.{ACTOR_PREFIX}*' tensors in the distributed checkpoint "
                       f"(state_dict prefixes: {sorted(prefixes)})")
    state = {"state_dict": request}
    with warnings.catch_warnings():  # "torch.distributed ... uninitialized, assuming ... a single process": intended
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=reader)  # only the requested keys are read
    extra = torch.load(meta_file, map_location="cpu", weights_only=False)
    return {**extra, "state_dict": state["state_dict"]}


def actor_state_dict(state_dict: dict[str, torch.Tensor], ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The ``actor.``-prefixed entries of a module state dict, with the prefix removed."""
    actor = {key[len(ACTOR_PREFIX):]: value for key, value in state_dict.items() if key.startswith(ACTOR_PREFIX)}
    if not actor:
        prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
        raise KeyError(f"{ckpt_path}: no '{ACTOR_PREFIX}*' weights in state_dict (top-level prefixes: {prefixes})")
    return actor


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, *, adapter_only: bool = False) -> Path:
    """Write the checkpoint's actor as a HF ``save_pretrained`` folder; return ``out_dir``.

    A LoRA run's checkpoint holds the adapters only (``model.lora``): they are loaded onto the base
    model from ``model_path`` and merged, ``W + s·B·A`` (:func:`archer.lora.merged_named_tensors`), or
    with ``adapter_only`` written as they are, a peft adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is ``model_path``. An adapter
    folder given as ``ckpt_path`` is merged onto its base model the same way.

    Args:
        ckpt_path: a Lightning checkpoint of the Archer module: a single file (``Trainer.save_checkpoint``
            / ``ModelCheckpoint``) or the folder ``ModelParallelStrategy`` (FSDP2) saves; or a peft
            adapter folder.
        out_dir: the folder to write (created; existing files of the same name are overwritten).
        adapter_only: write a LoRA checkpoint's adapters, not the merged model.
    """
    ckpt_file = Path(ckpt_path)
    if (ckpt_file / ADAPTER_CONFIG).is_file():
        if adapter_only:
            raise ValueError(f"{ckpt_file} is an adapter folder already; --adapter-only exports a checkpoint's adapters")
        return _merge_adapter_folder(ckpt_file, Path(out_dir))
    checkpoint = load_checkpoint(ckpt_file)
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
    lora = checkpoint["hyper_parameters"].get("lora")
    if lora is None:
        if adapter_only:
            raise ValueError(f"{ckpt_file}: --adapter-only needs a LoRA run's checkpoint (model.lora), this one trained "
                             "all weights")
        return _save_model(weights, model_dir, Path(out_dir), ckpt_file)
    model = _adapted_model(model_dir, LoraConfig(**lora) if isinstance(lora, dict) else lora, weights,
                           checkpoint["hyper_parameters"].get("dtype", "float32"), ckpt_file)
    out = Path(out_dir)
    if adapter_only:
        model.save_pretrained(out)  # transformers saves only the adapters of a model that has some
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
        return out
    return _save_model(dict(merged_named_tensors(model)), model_dir, out, ckpt_file)


def _adapted_model(model_dir: Path, lora: LoraConfig, adapters: dict[str, torch.Tensor], dtype: str,
                   ckpt_file: Path) -> torch.nn.Module:
    """The base model from ``model_dir`` in ``dtype`` with the checkpoint's adapters (every one of them, nothing else)."""
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]), lora)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(adapters) != expected:
        raise KeyError(f"{ckpt_file}: the checkpoint's actor tensors are not the adapters of model.lora = {lora} on "
                       f"{model_dir}: missing {sorted(expected - set(adapters))[:3]}, unexpected "
                       f"{sorted(set(adapters) - expected)[:3]}")
    model.load_state_dict(adapters, strict=False)
    return model


def _merge_adapter_folder(folder: Path, out: Path) -> Path:
    """A peft adapter folder merged onto its base model (``base_model_name_or_path``) as a HF folder."""
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path = {base!r} is not a local model folder")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model.load_adapter(str(folder))
    return _save_model(dict(merged_named_tensors(model)), Path(base), out, folder)


def _save_model(weights: dict[str, torch.Tensor], model_dir: Path, out: Path, ckpt_file: Path) -> Path:
    """``weights`` (Hugging Face names) as a ``save_pretrained`` folder of ``model_dir``'s architecture,
    with its tokenizer and generation config."""
    config = AutoConfig.from_pretrained(model_dir)
    # Built in the trained dtype, so the saved weights are bit-identical to the checkpoint's.
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
    weights = _complete_tied(weights, model, ckpt_file)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise KeyError(f"{ckpt_file}: actor weights do not match the architecture in {model_dir}: {error}") from error

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
