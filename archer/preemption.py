"""Preemption: on SIGTERM, finish the step, write a checkpoint, exit — the run resumes exactly from it.

Schedulers (SLURM's ``scancel`` or time limit, Kubernetes' pod eviction, spot reclaims) send SIGTERM
and, after a grace period, SIGKILL. Lightning notes the SIGTERM and stops after the current step,
but writes no checkpoint: everything since the last ``every_n_train_steps`` save would be lost.
:class:`CheckpointOnSigterm` (added by ``ArcherModule`` to every run) writes ``last.ckpt`` in the
``ModelCheckpoint`` folder at the end of the step in which the signal arrived — the same hook and
state as ``ModelCheckpoint``'s own saves, so ``--ckpt_path last`` continues as if uninterrupted —
and exits with :data:`EXIT_CODE` (128 + SIGTERM: the job was stopped, not finished). The ranks agree
(one max over ranks per step): each rank gets the signal at a different moment, and every rank must
take part in the save. The step under way must finish within the grace period (SLURM's ``KillWait``,
Kubernetes' ``terminationGracePeriodSeconds``); if it cannot, the checkpoint before it is the one
that counts, as after a SIGKILL.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from archer.distributed import Collectives

__all__ = ["EXIT_CODE", "CheckpointOnSigterm"]

EXIT_CODE = 143
"""The exit status after a SIGTERM (128 + 15, what a process killed by it reports)."""


class CheckpointOnSigterm(L.Callback):
    """After the step in which a rank received SIGTERM: ``last.ckpt``, ``before_exit()`` (if given),
    then ``SystemExit(143)``."""

    def __init__(self, before_exit: Callable[[], None] | None = None) -> None:
        self.before_exit = before_exit

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        received = torch.tensor(float(trainer.received_sigterm))
        if not float(Collectives().max(received)):
            return
        checkpoints = trainer.checkpoint_callbacks
        checkpoint = next((c for c in checkpoints if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if checkpoint is None:
            saved = "no ModelCheckpoint in trainer.callbacks: nothing was saved"
        else:
            path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            saved = f"saved {path}; resume with the same command and --ckpt_path last"
        if self.before_exit is not None:
            self.before_exit()
        if trainer.is_global_zero:
            print(f"archer: SIGTERM received: stopped after step {trainer.global_step} and {saved}", file=sys.stderr,
                  flush=True)
        raise SystemExit(EXIT_CODE)
