"""Asynchronous rollouts: a producer thread rolls out and scores the next prompt batches while the
trainer trains on the current one, with a bound on how stale their weights may be.

Steps and versions. Training step ``s`` (``global_step == s``) trains on prompt batch ``k`` of the
stream; the producer has rolled it out ahead of time. The rollout servers serve the weights of the
last sync: after the sync that follows step ``s − 1`` they serve the policy of step ``s``. A sample's
*step* is the step whose weights sampled its oldest token, and its *staleness*, when step ``s``
trains on it, is ``s − step``. The producer starts batch ``k`` (consumed at step ``s_k``) only once
the servers serve step ``s_k − K`` or later (``K = max_staleness``), so every sample arrives at most
``K`` steps stale: ``K = 0`` is on-policy (no overlap), ``K = 1`` one-step off-policy (batch ``k + 1``
is generated while step ``s_k`` trains). Tokens sampled after a sync that happened mid-generation
come from newer weights; a sample counts from its oldest span (the engine reports it). A sample
found staler than ``K`` anyway (a server that missed a sync) is dropped by the trainer and counted.

Why a thread, not a process: the producer mostly waits — on HTTP requests to the rollout servers
and on the reward worker processes — and Python releases the GIL while it waits. A thread shares
the prompt stream (whose position is what a checkpoint stores), the tokenizer and the engine (whose
version the trainer's syncs advance) without serialising anything. It never runs a collective:
those (FSDP gathers, the weight sync) stay on the training thread, at the same point on every rank.

Resume: nothing of the producer is checkpointed. A resumed run restarts it at the batch Lightning
delivers next (the stream position rules), so no prompt is skipped or trained on twice; batches
that were generated ahead and not yet trained on when the run was killed are generated again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from archer.config import AsyncRolloutConfig
from archer.sampling import GroupSampler, ScoredGroups

__all__ = ["AsyncSampler", "ProducedBatch", "RolloutProducer", "StalenessReport", "staleness"]


@dataclass
class ProducedBatch:
    """One batch rolled out and scored by the producer."""

    scored: ScoredGroups
    start_step: int
    """The step whose weights the servers served when the batch's generation started (its samples'
    oldest possible step, unless the engine reports an older span)."""
    producer_idle_s: float
    """Seconds the producer waited for the staleness bound before starting this batch."""


def staleness(produced: ProducedBatch, step: int, version_offset: int) -> Tensor:
    """``[N]`` staleness of each sample of ``produced`` when step ``step`` trains on it: ``step`` minus
    the step whose weights sampled its oldest token — the engine's ``weight_version`` of the sample
    (mapped to steps: ``step = version + version_offset``) or, when the engine reports none or a
    newer one, the step served when the batch started."""
    steps = [
        produced.start_step if c.weight_version is None else min(produced.start_step, c.weight_version + version_offset)
        for c in produced.scored.samples.completions
    ]
    return step - torch.tensor(steps)


class RolloutProducer:
    """Rolls out batches ``k, k + 1, ...`` on a background thread, each as soon as the staleness bound allows.

    Args:
        collect: Rolls out and scores batch ``index`` for the step ``step`` that will train on it
            (the step fixes its sampling seeds, so a resumed run samples what the uninterrupted one did).
        served_step: The step whose weights the rollout servers serve now.
        max_staleness: ``K``, see the module docstring.
    """

    def __init__(self, collect: Callable[[int, int], ScoredGroups], served_step: Callable[[], int], *, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.collect = collect
        self.served_step = served_step
        self.max_staleness = max_staleness
        self._ready: dict[int, ProducedBatch] = {}
        self._error: BaseException | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._first: tuple[int, int] | None = None  # (first batch index, the step that trains on it)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, index: int, step: int) -> None:
        """Start producing at batch ``index``, which step ``step`` will train on (one batch per step after it)."""
        if self._thread is not None:
            raise RuntimeError("RolloutProducer.start called twice")
        self._first = (index, step)
        self._thread = threading.Thread(target=self._run, name="archer-rollout-producer", daemon=True)
        self._thread.start()

    def step_of(self, index: int) -> int:
        first_index, first_step = self._first
        return first_step + (index - first_index)

    def _run(self) -> None:
        index = self._first[0]
        try:
            while True:
                step = self.step_of(index)
                waited = time.perf_counter()
                with self._condition:  # the staleness bound: the servers must serve step s_k − K or later
                    while not self._stopping and self.served_step() < step - self.max_staleness:
                        self._condition.wait(timeout=0.05)
                    if self._stopping:
                        return
                waited = time.perf_counter() - waited
                start_step = self.served_step()
                produced = ProducedBatch(self.collect(index, step), start_step, waited)
                with self._condition:
                    self._ready[index] = produced
                    self._condition.notify_all()
                index += 1
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by take()
            with self._condition:
                self._error = error
                self._condition.notify_all()

    def take(self, index: int) -> tuple[ProducedBatch, float]:
        """Batch ``index`` once it is ready, and the seconds the trainer waited for it; re-raises an
        error of the producer thread."""
        waited = time.perf_counter()
        with self._condition:
            while index not in self._ready and self._error is None:
                if not self.running:
                    raise RuntimeError("the rollout producer is not running")
                self._condition.wait(timeout=0.05)
            if index not in self._ready:
                raise RuntimeError("the rollout producer failed") from self._error
            produced = self._ready.pop(index)
            self._condition.notify_all()
        return produced, time.perf_counter() - waited

    def notify(self) -> None:
        """Wake the producer (the served step advanced)."""
        with self._condition:
            self._condition.notify_all()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the batch in progress (idempotent)."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


@dataclass
class StalenessReport:
    """How stale the batch a step took from the producer was, and how long each side waited."""

    lag: Tensor
    """``[N]`` each sample's staleness (:func:`staleness`)."""
    dropped: int
    """Samples masked out for being staler than ``max_staleness`` (whole groups)."""
    trainer_idle_s: float
    """Seconds the trainer waited for the batch."""
    producer_idle_s: float
    """Seconds the producer waited for the staleness bound before starting it."""


class AsyncSampler:
    """The asynchronous counterpart of :meth:`GroupSampler.collect`: each step's batch comes from a
    :class:`RolloutProducer` (started at the first step, or after a resume), with the groups holding a
    sample staler than ``max_staleness`` masked out.

    Args:
        sampler: Samples and scores on the producer thread (its own reward workers, local collectives).
        engine: The remote engine, whose ``version`` counts the weight syncs it received.
        batch_of: The prompt rows of stream batch ``index``.
        config: The staleness bound.
    """

    def __init__(self, sampler: GroupSampler, engine, batch_of: Callable[[int], list[dict]],
                 config: AsyncRolloutConfig) -> None:
        self.sampler = sampler
        self.engine = engine
        self.batch_of = batch_of
        self.config = config
        self._producer: RolloutProducer | None = None
        self._version_offset = 0

    def collect(self, index: int, step: int) -> tuple[ScoredGroups, StalenessReport]:
        """Stream batch ``index``, for training step ``step``, as the producer rolled it out."""
        if self._producer is None:
            self._version_offset = step - self.engine.version  # the servers now serve this step's weights
            self._producer = RolloutProducer(
                lambda i, s: self.sampler.collect(self.batch_of(i), s),
                served_step=lambda: self.engine.version + self._version_offset,
                max_staleness=self.config.max_staleness,
            )
            self._producer.start(index, step)
        produced, trainer_idle = self._producer.take(index)
        scored, n = produced.scored, self.sampler.sampling.n
        lag = staleness(produced, step, self._version_offset)
        fresh = (lag <= self.config.max_staleness).view(-1, n).all(-1).repeat_interleave(n)
        scored.keep = scored.keep & fresh
        return scored, StalenessReport(lag, int((~fresh).sum()), trainer_idle, produced.producer_idle_s)

    def stop(self) -> None:
        """Stop the producer, if any (idempotent)."""
        if self._producer is not None:
            self._producer.stop()
            self._producer = None
