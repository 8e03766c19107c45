"""Faults caused for real inside an ``archer fit`` run: test callbacks and engines, importable by the
runs' child processes (``conftest.py`` puts this folder on ``PYTHONPATH``).

Each one acts at a chosen RL step: it sends a real signal to a real process (the trainer itself, one
of its ranks, a vLLM server), skips or falsifies a weight sync, or sets a learning rate.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch

from archer.callbacks import WeightSyncCallback
from archer.rollout import named_full_tensors

CHILD_ENV = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                             os.environ.get("PYTHONPATH", "")])}
"""The environment of a child ``archer fit`` that uses these components (``harness.run_subprocess``
adds the harness folder)."""

__all__ = ["CHILD_ENV", "report_detection", "HangRankMidStep", "KillRankMidStep", "KillServerMidGeneration", "LearningRateAtStep", "SigkillWhileWritingLast",
           "SigtermAtStep", "SkipWeightSync", "StaleWeightSync"]


class SigtermAtStep(L.Callback):
    """Sends SIGTERM to this process at the start of step ``step``, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            print(f"fault: SIGTERM at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)


class KillRankMidStep(L.Callback):
    """SIGKILLs rank ``rank`` in the middle of step ``step`` (before its first backward pass: the other
    rank is then between two collectives of the update)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"fault: SIGKILL rank {self.rank} at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class LearningRateAtStep(L.Callback):
    """Sets the learning rate of step ``step``'s optimizer steps to ``lr`` (e.g. one so large that the
    update overflows the weights)."""

    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


class SkipWeightSync(WeightSyncCallback):
    """A weight sync that does not happen after step ``step`` (a bug in a sync path, a callback left out)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step - 1 != self.step:  # global_step already counts this step
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StaleWeightSync(WeightSyncCallback):
    """After step ``step`` the engine receives the weights the actor had before that step, as a sync
    that completes and counts a version but whose tensors never reached the engine's weights (TRL
    #5312: an engine asleep during the copy kept serving its old weights)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: list[tuple[str, torch.Tensor]] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = [(name, tensor.clone()) for name, tensor in named_full_tensors(pl_module.actor)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step - 1 == self.step:
            pl_module.rollout.load_weights(self.before)
        else:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class KillServerMidGeneration(L.Callback):
    """SIGKILLs the vLLM server launched by the run while it is generating, at step ``step`` or after
    (synchronous: during that step's rollout; asynchronous: while the producer rolls out)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.armed = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.step or self.armed:
            return
        self.armed = True
        engine = pl_module.rollout

        def kill_when_busy() -> None:
            while not engine.servers or not any(s.inflight for s in engine.servers):
                time.sleep(0.001)
            server = engine.servers[0]
            print(f"fault: SIGKILL server {server.url} at {time.time():.3f}", flush=True)
            os.killpg(server.process.pgid, signal.SIGKILL)

        threading.Thread(target=kill_when_busy, daemon=True).start()


class SigkillWhileWritingLast(L.Callback):
    """SIGKILLs every process of the run (both ranks, as a node failure would) while ``last.ckpt`` of step
    ``step`` is being written: the moment Lightning's ``meta.pt`` (written after the shards) appears
    in a folder named after ``last`` under ``watch_dir``. ``padding_mb`` makes that file slow to write."""

    def __init__(self, step: int, watch_dir: str, padding_mb: int = 64) -> None:
        self.step, self.watch_dir, self.padding_mb = step, Path(watch_dir), padding_mb

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.global_step < self.step or trainer.global_rank != 0:
            return
        checkpoint["padding"] = torch.ones(self.padding_mb * 2**18)
        started = time.time()

        def kill_while_writing() -> None:
            while True:
                for meta in self.watch_dir.glob("*last*/meta.pt"):
                    try:
                        if meta.stat().st_mtime >= started:
                            os.killpg(0, signal.SIGKILL)
                    except FileNotFoundError:
                        pass
                time.sleep(0.0005)

        threading.Thread(target=kill_while_writing, daemon=True).start()


class HangRankMidStep(L.Callback):
    """Rank ``rank`` stops making progress in the middle of step ``step`` (a deadlock, a hung kernel):
    it sleeps before its first backward pass, while the other rank waits in the update's collectives."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            print(f"fault: rank {self.rank} hangs at {time.time():.3f}", flush=True)
            time.sleep(3600)


def report_detection(log: Path, fault: str) -> float:
    """Print and return the seconds from the fault (the time its probe printed in the run's ``log``:
    ``<fault> ... at <time>``) until now, the run having ended (for docs/reliability.md, never asserted)."""
    started = float(re.search(re.escape(fault) + r".* at (\d+\.\d+)", log.read_text()).group(1))
    seconds = time.time() - started
    print(f"{fault}: the run ended {seconds:.1f} s later")
    return seconds


def fsdp2_remote_setup(rank: int, world: int, init_file: str, url: str, model_dir: str, weights_dir: str,
                       done_dir: str) -> None:
    """One rank of an FSDP2 actor whose ranks share the server ``url``: ``RemoteVLLMEngine.setup``
    (rank 0 pushes the weights as version 0), then a barrier; writes ``done_dir/rank{rank}`` after it.
    (``torch.multiprocessing.spawn`` target; a 30 s process-group timeout ends a mismatch.)"""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from archer.models import fully_shard_decoder
    from archer.rollout import RemoteVLLMEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        actor = AutoModelForCausalLM.from_pretrained(model_dir).float()
        fully_shard_decoder(actor, init_device_mesh("cpu", (world,)), None)
        engine = RemoteVLLMEngine(urls=[url], transport="files", weights_dir=weights_dir, startup_timeout_s=30)
        engine.setup(actor, None, model_dir)
        dist.barrier()
        Path(done_dir, f"rank{rank}").write_text(str(engine.version))
        engine.close()
    finally:
        dist.destroy_process_group()
