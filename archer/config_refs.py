"""``${key}`` in a config's strings: one setting derived from another, after every file and flag is read.

The shipped configs write every output path under the run directory::

    trainer:
      default_root_dir: runs/quickstart
      logger: {class_path: lightning.pytorch.loggers.CSVLogger,
               init_args: {save_dir: "${trainer.default_root_dir}", name: csv}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {dirpath: "${trainer.default_root_dir}/checkpoints"}

so ``--trainer.default_root_dir DIR`` moves the logs, checkpoints, token views and completion
tables together. A reference names any setting of the same command by its dotted key and is
replaced by that setting's final value (the last file or flag that set it), as OmegaConf's
interpolation does in verl's configs; ``--print_config`` shows the references unresolved.
A reference is a dotted key (``${section.key}``), so a LaTeX ``${n}$`` in a prompt template is left
alone; ``$${a.b}`` writes a literal ``${a.b}``.
"""

from __future__ import annotations

import re
from typing import Any

from jsonargparse import Namespace

__all__ = ["REFERENCE", "resolve_references"]

REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_]\w*(?:\.\w+)+)\}")
"""``${dotted.key}`` (at least one dot), not preceded by another ``$`` (the escape)."""

_ESCAPED = re.compile(r"\$(\$\{[A-Za-z_]\w*(?:\.\w+)+\})")
"""``$${dotted.key}``: a literal ``${dotted.key}`` (any other ``$${`` — LaTeX's ``$${x}^2$$`` — stays as written)."""

_MAX_DEPTH = 8
"""References resolved through others (``${a}`` where ``a`` is ``${b}/x``) before a cycle is assumed."""


def _lookup(config: Namespace, key: str, where: str) -> str:
    try:
        value = config[key]
    except KeyError:
        raise ValueError(f"{where}: ${{{key}}} refers to no setting ({key!r} is not a key of this config)") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: ${{{key}}} refers to {key} = {value!r}; it needs a string or number there")
    return str(value)


def _resolve_text(text: str, config: Namespace, where: str) -> str:
    for _ in range(_MAX_DEPTH + 1):  # a chain of _MAX_DEPTH references resolves
        if not REFERENCE.search(text):
            return _ESCAPED.sub(r"\1", text)
        text = REFERENCE.sub(lambda match: _lookup(config, match.group(1), where), text)
    raise ValueError(f"{where}: references nest deeper than {_MAX_DEPTH} levels (a cycle?): {text!r}")


def _resolve(value: Any, config: Namespace, where: str) -> Any:
    if isinstance(value, str):
        return _resolve_text(value, config, where)
    if isinstance(value, Namespace):
        for key in list(vars(value)):
            setattr(value, key, _resolve(getattr(value, key), config, f"{where}.{key}" if where else key))
        return value
    if isinstance(value, dict):
        return {key: _resolve(item, config, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, config, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def resolve_references(config: Namespace) -> None:
    """Replace, in place, every ``${key}`` in the strings of ``config`` by the value of ``config[key]``;
    a ``ValueError`` names the setting holding a reference to no setting, or to one that is not a
    string or number (an unset ``trainer.default_root_dir``, say)."""
    _resolve(config, config, "")
