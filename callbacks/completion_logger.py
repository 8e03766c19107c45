"""``CompletionLogger``: what the policy writes, every N steps, where people look.

Every ``every_n_steps`` RL steps it takes ``num_samples`` completions of the step (the first ones:
whole groups, so the completions of one prompt sit together) from the ``on_rollout_end`` hook
(:mod:`archer.rollout_view`) and writes them as a table with the columns :data:`COLUMNS`:

- to each logger that shows tables: W&B (``WandbLogger.log_table``, key ``completions``) and
  TensorBoard (a markdown table in the Text tab, tag ``completions``); a ``CSVLogger`` has none;
- appended to ``<trainer.log_dir>/completions.jsonl``, one JSON object per completion (read it with
  ``pandas.read_json(path, lines=True)``).

Only rank 0 writes, its own share of the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from archer.rollout_view import RolloutView

__all__ = ["COLUMNS", "CompletionLogger", "markdown_table"]

COLUMNS = ("step", "prompt", "completion", "answer", "reward", "advantage")
"""The table's columns (``answer``: the row's reference answer, empty for rows without one)."""

FILE_NAME = "completions.jsonl"


def markdown_table(columns: tuple[str, ...], rows: list[list[Any]]) -> str:
    """A markdown table (what TensorBoard's Text tab renders); cell text with ``|`` and newlines escaped."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


class CompletionLogger(L.Callback):
    """Every ``every_n_steps`` RL steps, a table of ``num_samples`` completions (module docstring).

    Args:
        every_n_steps: Write at the steps that are multiples of this (step 0 included).
        num_samples: Completions per table.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 8) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self._log_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # On every rank: ``trainer.log_dir`` is a broadcast, which rank 0 alone (in ``_write``) would
        # wait on forever.
        self._log_dir = Path(trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir)

    def on_rollout_end(self, trainer: L.Trainer, pl_module: L.LightningModule, rollout: RolloutView) -> None:
        if rollout.step % self.every_n_steps:
            return
        rows = [
            [rollout.step, rollout.prompts[i], rollout.completions[i], str(rollout.rows[i].get("answer", "")),
             rollout.rewards[i], rollout.advantages[i]]
            for i in range(min(self.num_samples, len(rollout.completions)))
        ]
        self._write(trainer, rollout.step, rows)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, step: int, rows: list[list[Any]]) -> None:
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_table", None)):  # W&B
                logger.log_table(key="completions", columns=list(COLUMNS), data=rows, step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("completions", markdown_table(COLUMNS, rows), global_step=step)
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / FILE_NAME, "a", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(dict(zip(COLUMNS, row)), ensure_ascii=False) + "\n")
