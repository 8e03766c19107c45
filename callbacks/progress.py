"""``RLProgressBar``: Lightning's rich progress bar counting RL steps, or one line per step in a log.

In a terminal it draws Lightning's rich bar, labelled "RL steps": the train data is an endless
prompt stream, so Lightning's "Epoch 0/-2" label says nothing, and its count runs from the
run's first step to ``trainer.max_steps`` also after a resume (Lightning's own total would be the
steps left, read against the steps done: ``30/19``). The logger's ``v_num`` is left out of the
bar's metrics.

When standard output is not a terminal (``nohup``, SLURM, a pipe) a bar would show nothing until
the run ends; it prints one line per step instead (every ``every_n_steps``)::

    step 12/300  reward 0.412  digit_copy pass@1 0.506 (step 10)  1.84 s/step  ETA 8m50s

with the mean reward of the step, each validation set's latest pass@1 and the step it was measured
at, the mean seconds per step since this process started and the time left at that pace, and a
line after each validation.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["RLProgressBar", "format_duration"]

PASS_AT_1 = re.compile(r"^val/(.+)/pass@1$")


def format_duration(seconds: float) -> str:
    """``42s``, ``8m50s``, ``3h07m``: a duration to the second under an hour, to the minute above."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RLProgressBar(RichProgressBar):
    """A rich bar in RL steps in a terminal; one line per step when standard output is not one.

    Args:
        lines: Print lines instead of drawing a bar. None: lines when standard output is not a terminal.
        every_n_steps: In line mode, print every this many RL steps (and the last one).
        refresh_rate: The bar's refreshes per second (Lightning's ``RichProgressBar``).
        leave: Keep the bar of each epoch on screen (Lightning's ``RichProgressBar``).
        theme: The bar's colours (Lightning's ``RichProgressBar``).
        console_kwargs: Passed to rich's ``Console`` (Lightning's ``RichProgressBar``).
    """

    def __init__(
        self,
        lines: bool | None = None,
        every_n_steps: int = 1,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme = RichProgressBarTheme(),
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.lines = lines
        self.every_n_steps = every_n_steps
        self._start: tuple[float, int] | None = None
        """When this process began training, and at which step (a resumed run starts past 0)."""
        self._pass_at_1: dict[str, tuple[float, int]] = {}
        """Per validation set, its latest pass@1 and the step it was measured at."""

    # ------------------------------------------------------------------------------- the bar
    @property
    def total_train_batches(self) -> int | float:
        # RL steps of the whole run, counted from 0 by the step itself (on_train_batch_end), so that
        # a resumed run reads 30/300, not Lightning's batches-left total.
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the label
        return f"{'RL steps':{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version folder, shown by Lightning as "v_num: 0.000"
        return metrics

    # --------------------------------------------------------------------------- line mode
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lines is None:
            self.lines = not sys.stdout.isatty()
        if self.lines:
            self.disable()  # the rich bar's hooks do nothing; the line hooks below print

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The bar counts the step (Lightning counts batches of this process: 11 after a resume at step 19).
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)
        step = trainer.global_step
        if self.lines and (step % self.every_n_steps == 0 or step == trainer.max_steps):
            self._print(self.step_line(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        values = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        for key, value in values.items():
            if match := PASS_AT_1.match(key):
                self._pass_at_1[match.group(1)] = (value, step)
        if self.lines and values:
            self._print(f"validation at step {step}: "
                        + "  ".join(f"{key.removeprefix('val/')} {value:.3f}" for key, value in sorted(values.items())))

    def step_line(self, trainer: L.Trainer) -> str:
        """The line of the step just trained (module docstring)."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total}" if total and total > 0 else f"step {step}"]
        reward = trainer.callback_metrics.get("reward")
        if reward is not None:
            parts.append(f"reward {float(reward):.3f}")
        parts += [f"{name} pass@1 {value:.3f} (step {at})" for name, (value, at) in self._pass_at_1.items()]
        if self._start is not None and step > self._start[1]:
            per_step = (time.monotonic() - self._start[0]) / (step - self._start[1])
            parts.append(f"{per_step:.2f} s/step")
            if total and total > 0:
                parts.append(f"ETA {format_duration(per_step * (total - step))}")
        return "  ".join(parts)

    @rank_zero_only
    def _print(self, line: str) -> None:
        print(line, flush=True)
