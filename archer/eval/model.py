"""The model folder ``archer eval`` samples from, and the name its results give it.

A Hugging Face folder is used as it is. A Lightning checkpoint (a ``.ckpt`` file, or the folder
FSDP2's ``ModelParallelStrategy`` saves) or a LoRA adapter folder (``archer export --adapter-only``:
merged onto the base model it names) is exported to ``OUT/model`` first, under a temporary
name renamed when complete, with ``OUT/model/archer_source.json``: the checkpoint's path and the
size and modification time of each of its files. A rerun reuses the export only while these are
unchanged; a checkpoint overwritten since (training went on and saved ``last.ckpt`` again) is
exported again, and the outputs sampled from the old one are removed first, with a one-line notice.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from archer.export import export_checkpoint, is_distributed_checkpoint

__all__ = ["SOURCE_FILE", "checkpoint_fingerprint", "prepare_model", "model_label", "parse_model", "model_names"]

SOURCE_FILE = "archer_source.json"
"""In ``OUT/model``: :func:`checkpoint_fingerprint` of the checkpoint it was exported from."""


def checkpoint_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the checkpoint at ``path`` without reading it: its resolved path and, for
    each of its files (the ``.ckpt`` file, or every file of a sharded folder), ``[size in bytes,
    modification time in ns]``. Saving the checkpoint again changes the times."""
    path = path.resolve()
    files = {path.name: path} if path.is_file() else {str(f.relative_to(path)): f for f in sorted(path.rglob("*"))
                                                      if f.is_file()}
    stats = {name: f.stat() for name, f in files.items()}
    return {"checkpoint": str(path), "files": {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}}


def _exported_from(folder: Path) -> dict[str, Any] | None:
    source = folder / SOURCE_FILE
    return json.loads(source.read_text()) if source.is_file() else None


def prepare_model(model: str, out_dir: Path, outputs: Iterable[str] = ()) -> Path:
    """The HF folder to sample from: ``model`` itself, or a Lightning checkpoint exported to ``OUT/model``.

    Args:
        model: a Hugging Face folder, a ``.ckpt`` file, a sharded (FSDP2) checkpoint folder, or a LoRA
            adapter folder.
        out_dir: the eval's output folder.
        outputs: names of the files in ``out_dir`` sampled from the model; removed, before the
            export, when the checkpoint is not the one ``OUT/model`` was exported from (so a kill
            during the new export cannot leave the old samples beside it).
    """
    path = Path(model)
    target = out_dir / "model"
    if path.is_file() or is_distributed_checkpoint(path) or (path / "adapter_config.json").is_file():
        source = checkpoint_fingerprint(path)
        if (target / "config.json").is_file():  # exported by an earlier run of this eval
            before = _exported_from(target)
            if before == source:
                return target
            why = "its files' sizes or modification times changed" if before else "the export has no record of its source"
            print(f"[archer eval] {model} is not the checkpoint {target} was exported from ({why}): exporting it again; "
                  f"the samples and results of the old one in {out_dir} are removed", file=sys.stderr)
            for name in outputs:
                (out_dir / name).unlink(missing_ok=True)
        # Exported under a temporary name, renamed when complete: a kill midway must not leave an
        # OUT/model with a config.json and missing weights that the next run would take as done.
        partial = out_dir / "model.partial"
        shutil.rmtree(partial, ignore_errors=True)
        export_checkpoint(path, partial)  # a file, or a sharded folder (only its actor's tensors are read)
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # the old export, or a torn one of an older version of this code
        os.replace(partial, target)
        return target
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model}: neither a Hugging Face model folder (config.json), nor a Lightning checkpoint file (.ckpt), "
            "nor a sharded (FSDP2) checkpoint folder (.metadata)"
        )
    return path


def model_label(model: str) -> str:
    """A short name for ``model`` in ``results.md``: the folder's name, and for a checkpoint its parent's
    parent too (``archer_math_1.5b/last.ckpt``: every run's checkpoint is ``checkpoints/last.ckpt``)."""
    path = Path(model).resolve()
    name = path.name or str(path)  # "/" has no name
    checkpoint = path.suffix == ".ckpt" or path.is_file() or is_distributed_checkpoint(path)
    if checkpoint and path.parent.parent.name:
        name = f"{path.parent.parent.name}/{name}"
    return name or "model"


def parse_model(spec: str) -> tuple[str | None, str]:
    """``(name, model)`` of ``NAME=MODEL`` (a name without ``/``, and no such file or folder as the
    whole string), else ``(None, spec)``."""
    name, sep, model = spec.partition("=")
    if sep and name and model and "/" not in name and not Path(spec).exists():
        return name, model
    return None, spec


def model_names(specs: list[str]) -> dict[str, str]:
    """Name -> model of several ``MODEL`` or ``NAME=MODEL``; a model without a name is named by
    :func:`model_label` (``/`` written ``_``: the name is also its output folder's). Two of the same
    name are refused."""
    named: dict[str, str] = {}
    for spec in specs:
        name, model = parse_model(spec)
        name = name or model_label(model).replace("/", "_")
        if name in named or name in (".", ".."):
            raise ValueError(f"two models are named {name!r} ({named.get(name)} and {model}): name them, "
                             "e.g. archer eval base=MODEL_A trained=MODEL_B ...")
        named[name] = model
    return named
