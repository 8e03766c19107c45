"""One row per RL step in the loggers, without ``LightningModule.log`` per key.

``self.log_dict`` keeps a result object per key and updates it, moved to the module's device, on
every call: ~0.35 ms a key on CPU, ~15 ms for the ~44 keys of a step (7% of a quickstart step,
measured with py-spy). The step's metrics are already reduced over ranks
(:mod:`archer.step_metrics`), so none of that is needed. :class:`StepLog` collects the step's values
— the module's, and any a callback adds in its ``on_train_batch_end``
(:meth:`archer.module.ArcherModule.log_step_metric`, e.g. ``time/weight_sync_s``) — and writes them
in **one** call at the end of the step, through Lightning's own path to the loggers:

- as float32 scalars (what ``self.log`` makes of Python floats), at the step Lightning numbers its
  rows with, with the ``epoch`` key, on the steps ``log_every_n_steps`` selects (or when the run stops);
- into ``trainer.callback_metrics`` as 0-dim tensors as soon as they are added, every step (progress
  bars, ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` read them there);
- a step that raises before its end (a stopping check in ``training_step``) writes no row; a step
  ended by SIGTERM writes its row before the exit, whatever ``log_every_n_steps`` says
  (:class:`archer.preemption.CheckpointOnSigterm`).

Two differences from ``self.log_dict``, both what docs/metrics.md says: a key a step did not produce
(a ratio with nothing measured, ``rollout/canary_gap`` without engine log-probs) is absent from that
step's row instead of repeating an earlier step's value; and ``trainer.logged_metrics`` holds the
values of the last written row as Python floats. A value a callback logs with ``pl_module.log``
still reaches the loggers through Lightning, as a second row at the same step.
"""

from __future__ import annotations

import lightning as L
import torch

__all__ = ["StepLog"]


class StepLog:
    """The current RL step's metrics, written to the loggers once, at the step's end."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}

    def add(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Add ``metrics`` (numbers, the same on every rank) to this step's row and to ``trainer.callback_metrics``."""
        keys = list(metrics)
        values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float32)
        trainer.callback_metrics.update(zip(keys, values.unbind()))
        self.pending.update(zip(keys, values.tolist()))

    def discard(self) -> None:
        """Forget what was added (a new step starts)."""
        self.pending = {}

    def write(self, trainer: L.Trainer, *, last: bool = False) -> None:
        """Write this step's row, if ``log_every_n_steps`` selects the step or it is the ``last`` one
        this process runs (preemption), and start a new one."""
        pending, self.pending = self.pending, {}
        connector = trainer._logger_connector  # Lightning's own path to the loggers: step numbering, epoch, save
        if pending and (last or connector.should_update_logs or trainer.fast_dev_run):
            connector.log_metrics(pending)
