"""``DataParallelVLLMEngine``: each call's prompts split over several ``VLLMEngine`` processes.

Every engine runs in its own spawned process, pinned to one GPU (``CUDA_VISIBLE_DEVICES`` is set
before anything touches CUDA; on CPU the engines share the cores). A call's prompts are split into
contiguous parts, one per engine, and each part keeps the per-prompt seeds it would have had in a
single engine (``VLLMEngine`` gives prompt ``i`` of a call the seed ``seed + i · n``, so the part
starting at prompt ``s`` is sent with seed ``seed + s · n``): the samples equal one
``VLLMEngine``'s, whatever the number of engines.

Limits: it samples from the model folder as saved. It takes no weights (``load_weights`` raises)
and refuses a live actor in ``setup``, so it does not fit the RL loop, whose weights change every
step (use ``VLLMEngine`` or ``RemoteVLLMEngine`` there); it serves ``archer eval`` on several GPUs
and any sampling from a fixed model. Tensor parallelism is not available (one GPU per engine).

Faults: a worker that raises, at start or in ``generate``, sends its traceback back and the engine
raises it, naming the worker; a worker that dies (killed, out of memory) is reported with its exit
status instead of a bare ``EOFError`` / ``BrokenPipeError``. After any failure every worker is
stopped (the engine is closed). A worker that does not answer — hung in a kernel, stopped, deadlocked —
is waited on for ``startup_timeout_s`` at start and ``request_timeout_s`` per call, then reported
with its pid, and every worker is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Iterable
from dataclasses import replace
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
from torch import nn

from archer.rollout.base import Completion, SamplingConfig
from archer.rollout.vllm import VLLMEngine

__all__ = ["DataParallelVLLMEngine"]


def _visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def _worker(gpu: str | None, model_path: str, engine_args: dict[str, Any], connection: Connection) -> None:
    """One engine process: pinned to ``gpu``, it answers ``(prompts, sampling)`` requests with
    ``("ok", groups)`` until it receives None; an exception is answered ``("error", traceback)``."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        from transformers import AutoTokenizer

        engine = VLLMEngine(**engine_args)
        engine.setup(None, AutoTokenizer.from_pretrained(model_path), model_path)
        connection.send(("ok", None))
        while (request := connection.recv()) is not None:
            connection.send(("ok", engine.generate(*request)))
    except EOFError:  # the parent is gone
        return
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        with contextlib.suppress(OSError):  # unless the parent is gone
            connection.send(("error", traceback.format_exc()))


class DataParallelVLLMEngine:
    """``size`` ``VLLMEngine`` processes (one GPU each) that split every call's prompts.

    Args:
        size: Engines (processes); None: one per visible GPU (one on CPU).
        engine_args: Keyword arguments of each :class:`~archer.rollout.VLLMEngine` (``dtype``,
            ``max_model_len``, ``kv_cache_memory_bytes``, ...); ``tensor_parallel_size`` must be 1.
        startup_timeout_s: Longest wait for an engine to load its model.
        request_timeout_s: Longest wait for an engine's share of one ``generate`` call.
    """

    logprobs_match_trainer = False
    """vLLM's log-probs, as :class:`~archer.rollout.VLLMEngine`'s."""

    def __init__(self, size: int | None = None, engine_args: dict[str, Any] | None = None,
                 startup_timeout_s: float = 1800.0, request_timeout_s: float = 3600.0) -> None:
        if size is not None and size < 1:
            raise ValueError(f"DataParallelVLLMEngine size must be >= 1 or None, got {size}")
        if not (startup_timeout_s > 0 and request_timeout_s > 0):
            raise ValueError(f"DataParallelVLLMEngine timeouts must be > 0, got startup_timeout_s={startup_timeout_s}, "
                             f"request_timeout_s={request_timeout_s}")
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.engine_args = dict(engine_args or {})
        if VLLMEngine(**self.engine_args).tensor_parallel_size != 1:  # bad arguments fail here, not in a worker
            raise ValueError("DataParallelVLLMEngine pins each engine to one GPU: tensor_parallel_size must be 1")
        self.size = size
        self._connections: list[Connection] = []
        self._processes: list[BaseProcess] = []

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Start the engines on the folder ``model_path`` and wait until each is ready. ``actor``
        must be None: the engines cannot receive its weights."""
        if actor is not None:
            raise ValueError("DataParallelVLLMEngine samples from the saved model folder and takes no weights, so it "
                             "cannot follow a training actor: use VLLMEngine or RemoteVLLMEngine for training")
        if self._processes:
            raise RuntimeError("DataParallelVLLMEngine.setup called twice")
        gpus = _visible_gpus()
        size = self.size or max(1, len(gpus))
        if gpus and len(gpus) < size:
            raise ValueError(f"DataParallelVLLMEngine size={size} but only {len(gpus)} GPUs are visible")
        context = get_context("spawn")
        try:
            for rank in range(size):
                parent, child = context.Pipe()
                gpu = gpus[rank] if gpus else None  # CPU: every engine shares the cores
                process = context.Process(target=_worker, args=(gpu, str(model_path), self.engine_args, child),
                                          daemon=True)
                process.start()
                child.close()  # only the worker holds its end: a dead worker reads as EOF here
                self._connections.append(parent)
                self._processes.append(process)
            deadline = time.monotonic() + self.startup_timeout_s
            for rank in range(size):
                self._receive(rank, deadline, f"start (startup_timeout_s={self.startup_timeout_s:g})")
        except BaseException:
            self.close()
            raise

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Unsupported: the engines sample from the saved folder."""
        raise NotImplementedError("DataParallelVLLMEngine takes no weights (it samples from the saved model folder): "
                                  "use VLLMEngine or RemoteVLLMEngine for training")

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (outer list aligned with the prompts)."""
        if not self._connections:
            raise RuntimeError("DataParallelVLLMEngine used before setup or after close (or a failure)")
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        size = len(self._connections)
        bounds = [len(prompt_token_ids) * rank // size for rank in range(size + 1)]
        try:
            busy = []
            for rank in range(size):
                start, stop = bounds[rank], bounds[rank + 1]
                if start == stop:
                    continue
                # Offset the seed so prompt `start + i` gets the seed a single engine would give it.
                seed = None if sampling.seed is None else sampling.seed + start * sampling.n
                self._send(rank, (prompt_token_ids[start:stop], replace(sampling, seed=seed)))
                busy.append(rank)
            deadline, what = time.monotonic() + self.request_timeout_s, f"generate (request_timeout_s={self.request_timeout_s:g})"
            return [group for rank in busy for group in self._receive(rank, deadline, what)]
        except BaseException:  # the other workers' answers would be left in their pipes
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        """What a rollout waits on, in the watchdog's messages."""
        return f"vLLM data-parallel engines (pids {', '.join(str(p.pid) for p in self._processes)})"

    def close(self, grace_s: float = 30.0) -> None:
        """Stop every engine process (killed if it does not exit within ``grace_s``); idempotent."""
        for connection in self._connections:
            with contextlib.suppress(OSError):  # unless that worker is already gone
                connection.send(None)
        for connection, process in zip(self._connections, self._processes):
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self._connections, self._processes = [], []

    def _send(self, rank: int, message: Any) -> None:
        try:
            self._connections[rank].send(message)
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker died
            raise self._died(rank) from None

    def _receive(self, rank: int, deadline: float, what: str) -> Any:
        connection, process = self._connections[rank], self._processes[rank]
        try:
            answered = False
            while not answered and time.monotonic() < deadline:
                answered = connection.poll(max(0.0, min(1.0, deadline - time.monotonic())))
            if answered:  # an answer, or the end of the pipe of a worker that died
                status, payload = connection.recv()
        except (EOFError, OSError):
            raise self._died(rank) from None
        if not answered:
            self.close(grace_s=0)  # a hung worker would not read the stop message
            raise TimeoutError(f"vLLM data-parallel engine {rank} (pid {process.pid}) did not answer its {what} "
                               "in time; every engine was stopped")
        if status == "error":
            raise RuntimeError(f"vLLM data-parallel engine {rank} (pid {self._processes[rank].pid}) failed:\n{payload}")
        return payload

    def _died(self, rank: int) -> RuntimeError:
        """The error for a worker whose pipe closed: how it ended, from its exit status."""
        process = self._processes[rank]
        process.join(timeout=10)
        code = process.exitcode
        if code is None:
            how = "closed its pipe but is still running"
        elif -code == signal.SIGKILL:
            how = "was killed by SIGKILL (the kernel's out-of-memory killer sends it)"
        elif code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return RuntimeError(f"vLLM data-parallel engine {rank} (pid {process.pid}) {how}")
