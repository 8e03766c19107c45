"""Test-only parts that the distributed tests load by ``class_path`` in their child processes.

Everything here is real code on the real training path: an ``HFEngine`` subclass that records
what each rank rolls out, a reward that really returns NaN, and callbacks that really SIGKILL the
process. The tests put this folder on ``PYTHONPATH`` so that Lightning's DDP children (which
re-run the same command) import it too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from archer.data.tasks import DigitCopyTask
from archer.rollout import HFEngine
from archer.rollout.base import Completion, SamplingConfig


RANK_SEED_STRIDE = 10_007
"""The rank's coefficient in ``ArcherModule._seed``."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RecordingHFEngine(HFEngine):
    """``HFEngine`` that appends, per ``generate`` call, the prompts and group sizes to
    ``record_dir/rank{r}.jsonl``.

    Args:
        record_dir: Folder of the per-rank JSON-lines records.
        seed_by_prompt: Sample each prompt's group with a seed computed from the prompt's tokens and
            the module's seed for this step with its rank term removed, so a prompt gets the same
            samples whichever rank rolls it out (a 1-process run can be compared with N processes)
            and a resumed run still samples what the uninterrupted one did.
    """

    def __init__(self, record_dir: str, seed_by_prompt: bool = False) -> None:
        super().__init__()
        self.record_dir = Path(record_dir)
        self.seed_by_prompt = seed_by_prompt
        self.calls = 0

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if self.seed_by_prompt:
            groups = []
            for prompt in prompt_token_ids:
                # ArcherModule._seed adds RANK_SEED_STRIDE * rank to the (base seed, step, draw) part.
                step_seed = sampling.seed - RANK_SEED_STRIDE * _rank()
                seed = (zlib.crc32(str(prompt).encode()) + step_seed) % 2**31
                groups += super().generate([prompt], replace(sampling, seed=seed))
        else:
            groups = super().generate(prompt_token_ids, sampling)
        record = {
            "call": self.calls,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "prompts": prompt_token_ids,
            "group_sizes": [len(group) for group in groups],
            "completions": [[c.token_ids for c in group] for group in groups],
        }
        self.record_dir.mkdir(parents=True, exist_ok=True)
        with open(self.record_dir / f"rank{_rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.calls += 1
        return groups


class NaNAfterMarkerReward(DigitCopyTask):
    """``DigitCopyTask``'s score, but NaN once the file ``marker`` exists (a reward bug appearing mid-run).

    Args:
        marker: Path of the file whose existence switches the reward to NaN.
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, response: str, row: dict) -> float:
        return math.nan if os.path.exists(self.marker) else self.score(response, row)


class TouchFileAtStep(L.Callback):
    """Creates ``path`` once ``trainer.global_step`` reaches ``step`` (after that step's checkpoint)."""

    def __init__(self, path: str, step: int) -> None:
        self.path = path
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(self.path).touch()


class SigkillAfterStep(L.Callback):
    """SIGKILLs this process (no cleanup, no exception handling) once ``global_step`` reaches ``step``.

    Registered after ``ModelCheckpoint`` so a checkpoint due at the same step is written first.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SigkillWhileSaving(L.Callback):
    """SIGKILLs this process while the checkpoint of step ``step`` is being written.

    ``on_save_checkpoint`` runs while the checkpoint dict is built, before any byte is written. It
    pads the checkpoint with ``padding_mb`` MiB (so writing takes a while) and starts a thread that
    watches ``watch_dir`` (the checkpoint folder, where ``AtomicCheckpointIO`` stages the file) and
    kills the process the moment a staged file appears, i.e. in the middle of the write.
    """

    def __init__(self, step: int, watch_dir: str, padding_mb: int = 256) -> None:
        self.step = step
        self.watch_dir = Path(watch_dir)
        self.padding_mb = padding_mb

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.global_step < self.step:
            return
        checkpoint["padding"] = torch.ones(self.padding_mb * 2**18)  # float32: 4 bytes each
        before = set(self.watch_dir.iterdir())

        def kill_when_staged() -> None:
            while not set(self.watch_dir.iterdir()) - before:
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_when_staged, daemon=True).start()
