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
from archer.losses import ArcherLoss
from archer.rollout import HFEngine
from archer.rollout.base import Completion, SamplingConfig
from archer.seeding import derive_seed, rank_seed


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
                # ArcherModule._seed makes the draw's seed rank-specific with rank_seed (an involution).
                step_seed = rank_seed(sampling.seed, _rank())
                seed = derive_seed(zlib.crc32(str(prompt).encode()), step_seed)
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


class NaNLossOnCalls(ArcherLoss):
    """``ArcherLoss`` whose loss is NaN on the given 0-based calls in this process (a numerical fault
    in the middle of an RL step: fp16 overflow, a bad kernel). The backward then makes the gradients
    NaN for real, and the trainer must skip that optimizer step.

    Args:
        calls: Which calls (micro-batches, counted from 0 in this process) return NaN.
        kwargs: ``ArcherLoss`` settings.
    """

    def __init__(self, calls: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = set(calls)
        self.count = 0

    def __call__(self, *args, **kwargs):
        loss, stats = super().__call__(*args, **kwargs)
        self.count += 1
        return (loss * math.nan if self.count - 1 in self.calls else loss), stats


class ConstantReward:
    """Scores every response ``value``: every group is all-equal, so dynamic sampling drops them all.

    Args:
        value: The score.
    """

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self, response: str, row: dict) -> float:
        return self.value


class TextReward:
    """Returns the answer as text (not a number): a reward bug the runner must count as an error."""

    def __call__(self, response: str, row: dict) -> float:
        return row["answer"]


class ConstantOnRankOneReward(DigitCopyTask):
    """``DigitCopyTask``'s score on rank 0, 0 on rank 1 (read from ``LOCAL_RANK``, which Lightning sets in
    the processes it launches): rank 1 never has an informative group, so with refill it wants more
    batches than rank 0 does."""

    def __call__(self, response: str, row: dict) -> float:
        return 0.0 if os.environ.get("LOCAL_RANK", "0") == "1" else self.score(response, row)


class OnlyPromptReward:
    """1 for every response to the prompt ``prompt``, 0 for the others: pass@k of a data set is then
    exactly (prompts equal to ``prompt``) / (prompts counted).

    Args:
        prompt: The row prompt that scores 1.
    """

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def __call__(self, response: str, row: dict) -> float:
        return float(row["prompt"] == self.prompt)


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


class CountGradientReductions(L.Callback):
    """Counts the gradient reductions each training step makes, and the gradient elements they carry,
    and appends them, per step, to ``record_dir/reductions{rank}.jsonl``: DDP's bucket all-reduces
    (through a DDP communication hook that counts, then all-reduces as DDP does by default) or FSDP2's
    reduce-scatters (by counting calls of ``torch.distributed.reduce_scatter_single``, which FSDP2
    calls for them, and the elements of their input).

    Args:
        record_dir: Folder of the per-rank JSON-lines records.
    """

    def __init__(self, record_dir: str) -> None:
        self.record_dir = Path(record_dir)
        self.count = 0
        self.elements = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(trainer.strategy.model, DistributedDataParallel):
            def counting_hook(state, bucket):
                self.count += 1
                self.elements += bucket.buffer().numel()
                return allreduce_hook(state, bucket)

            trainer.strategy.model.register_comm_hook(dist.group.WORLD, counting_hook)
        else:
            reduce_scatter = dist.reduce_scatter_single

            def counting_reduce_scatter(output, input, *args, **kwargs):
                self.count += 1
                self.elements += input.numel()
                return reduce_scatter(output, input, *args, **kwargs)

            dist.reduce_scatter_single = counting_reduce_scatter

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.count = 0
        self.elements = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        with open(self.record_dir / f"reductions{_rank()}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "reductions": self.count, "elements": self.elements}) + "\n")
