"""Score many responses in worker processes that can be killed when a reward hangs.

A reward is arbitrary code (math-verify's sympy can spin for minutes in C; a buggy reward can
``while True: pass``), so it runs in worker processes: ``num_workers`` long-lived processes, each
fed one (response, row) at a time over a pipe. When one does not answer within ``timeout_s`` it
is SIGKILLed and replaced, the item scores 0 and counts as a timeout, and the batch goes on.
A reward that raises, or returns anything but a finite number (NaN, inf, a string), scores 0 and
counts as an error with its message: one NaN would otherwise make its whole group's advantages NaN.

Start method: ``"fork"`` by default (Linux). Forking is fast and needs no pickling of the
reward, and the child only runs the reward loop, never torch; but a fork copies only the
calling thread, so a lock held by another thread at that instant stays locked in the child.
Workers are therefore forked once, in ``__init__`` (create the runner before training starts
its threads, e.g. in ``setup``), and again only to replace a killed worker. ``"forkserver"``
or ``"spawn"`` avoid the issue at the price of a slower start and a picklable reward.

Batched rewards (:class:`~archer.rewards.BatchedReward`, ``batched = True``) are called with lists:
the batch is split into one contiguous chunk per worker, a chunk of ``k`` responses gets
``k × timeout_s``, and a chunk that raises or times out scores 0 for all of its responses (a
non-finite score is still an error of its response only).

On the training thread, scoring is the watchdog's ``reward`` phase (:mod:`archer.watchdog`), whose
deadline bounds a batch whatever its size (each call is bounded by ``timeout_s`` already).

Workers ignore Ctrl-C (SIGINT reaches the whole process group) and SIGTERM (a scheduler's preemption
signal reaches every process of the job): the parent decides what an interrupt stops, and kills them
in :meth:`RewardRunner.close` or, on a path that never closed the runner (an error, an interrupt),
when the interpreter exits: multiprocessing's own exit handler would SIGTERM them and wait forever.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # registers multiprocessing's exit handler before ours (atexit runs LIFO)
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from archer import watchdog
from archer.rewards.base import Reward, is_batched

__all__ = ["RewardResult", "RewardRunner"]


@dataclass
class RewardResult:
    """Scores of one batch and what went wrong."""

    scores: list[float]
    """One score per response, in input order; 0.0 for errors and timeouts."""
    num_errors: int = 0
    """Responses whose reward raised, returned a non-finite or non-numeric value, or whose worker died."""
    num_timeouts: int = 0
    """Responses whose reward did not finish within ``timeout_s``."""
    errors: list[str] = field(default_factory=list)
    """The first few error messages, for logs."""

    def __add__(self, other: RewardResult) -> RewardResult:
        """Both batches' scores and counts, in order (error messages capped as in one batch)."""
        return RewardResult(
            scores=self.scores + other.scores,
            num_errors=self.num_errors + other.num_errors,
            num_timeouts=self.num_timeouts + other.num_timeouts,
            errors=(self.errors + other.errors)[: RewardRunner.MAX_KEPT_ERRORS],
        )


def _as_score(value: object) -> float:
    """A reward's return value as a finite float, or ``ValueError``: a NaN, an infinity or a string
    that slipped through ``float()`` would poison its whole group's advantages, or train on a typo."""
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        raise ValueError(f"reward returned {type(value).__name__} {value!r:.80}, expected a number")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward returned {score}, expected a finite number")
    return score


def _error_message(error: Exception) -> str:
    return f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}"


def _score_items(reward: Reward, responses: list[str], rows: list[dict]) -> list[tuple[bool, float | str]]:
    """``(True, score)`` or ``(False, error message)`` for each response: one call of a batched reward
    (all fail together if it raises), else one call for the one response."""
    try:
        if is_batched(reward):
            values = list(reward.score_batch(responses, rows))
            if len(values) != len(responses):
                raise ValueError(f"score_batch returned {len(values)} scores for {len(responses)} responses")
        else:
            values = [reward(responses[0], rows[0])]
    except Exception as error:  # noqa: BLE001 - a failing reward is data, reported to the parent
        return [(False, _error_message(error))] * len(responses)
    results: list[tuple[bool, float | str]] = []
    for value in values:
        if isinstance(value, Exception):  # a batched reward's failure of this response alone
            results.append((False, f"{type(value).__name__}: {value}"))
            continue
        try:
            results.append((True, _as_score(value)))
        except ValueError as error:
            results.append((False, f"ValueError: {error}"))
    return results


def _worker_loop(
    reward: Reward,
    connection: multiprocessing.connection.Connection,
    parent_end: multiprocessing.connection.Connection,
) -> None:
    # A forked worker inherits the parent's end of its own pipe; holding it open would keep
    # `recv` from ever seeing EOF, so a worker would outlive a SIGKILLed trainer.
    parent_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (module docstring)
    # SIGTERM too: SLURM and Kubernetes send it to every process of a job; the trainer finishes its step
    # (which may need the workers) and checkpoints; the workers end when it closes their pipes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            responses, rows = connection.recv()
        except EOFError:  # the runner closed its end
            return
        connection.send(_score_items(reward, responses, rows))


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return "was killed by SIGKILL (the kernel's out-of-memory killer sends it)"
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"died (exit code {exitcode})"


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, reward: Reward) -> None:
        if _exiting:  # a replacement asked for while the interpreter exits (a producer thread still scoring)
            raise RuntimeError("reward worker not started: the process is exiting")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(reward, child_end, self.connection), daemon=True)
        self.process.start()
        _LIVE_WORKERS.add(self)
        child_end.close()
        self.unit: list[int] | None = None
        """The indices of the responses it is scoring (one, or a batched reward's chunk)."""
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()
        _LIVE_WORKERS.discard(self)


_LIVE_WORKERS: set[_Worker] = set()
"""Workers not killed yet, of every runner of this process (held strongly: a runner dropped while its
worker is stuck in a reward call still leaves a worker to kill)."""
_exiting = False


@atexit.register
def _kill_live_workers() -> None:
    # Runs before multiprocessing's exit handler, which SIGTERMs daemonic children (ignored by these)
    # and joins them without a timeout. No worker starts after this.
    global _exiting
    _exiting = True
    for worker in list(_LIVE_WORKERS):
        worker.kill()


class RewardRunner:
    """Runs ``reward`` over batches in ``num_workers`` killable worker processes.

    Args:
        reward: the reward to run (see :class:`archer.rewards.Reward`).
        timeout_s: limit per response, in seconds; past it the worker is killed, the score is 0.
        num_workers: worker processes.
        start_method: multiprocessing start method (module docstring explains the default).
    """

    MAX_KEPT_ERRORS = 8
    """Error messages kept per batch."""

    def __init__(
        self,
        reward: Reward,
        timeout_s: float = 10.0,
        num_workers: int = 2,
        start_method: Literal["fork", "forkserver", "spawn"] = "fork",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RewardRunner num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"RewardRunner timeout_s must be > 0, got {timeout_s}")
        self.reward = reward
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context(start_method)
        self._workers = [_Worker(self._context, reward) for _ in range(num_workers)]

    def score(self, responses: list[str], rows: list[dict]) -> RewardResult:
        """Score ``responses[i]`` against ``rows[i]`` for every i."""
        if len(responses) != len(rows):
            raise ValueError(f"RewardRunner.score: {len(responses)} responses but {len(rows)} rows")
        if not self._workers:
            raise RuntimeError("RewardRunner.score called after close()")
        pids = ", ".join(str(worker.process.pid) for worker in self._workers)
        with watchdog.phase("reward", f"reward workers (pids {pids})"):
            return self._score(responses, rows)

    def _score(self, responses: list[str], rows: list[dict]) -> RewardResult:
        result = RewardResult(scores=[0.0] * len(responses))
        pending = deque(self._units(len(responses)))
        busy: dict[multiprocessing.connection.Connection, _Worker] = {}

        def record_error(message: str) -> None:
            result.num_errors += 1
            if len(result.errors) < self.MAX_KEPT_ERRORS:
                result.errors.append(message)

        while pending or busy:
            for worker in self._workers:
                if worker.unit is None and pending:
                    if not worker.process.is_alive():  # it died while idle (the OOM killer): a new one scores
                        worker = self._replace(worker)
                    worker.unit = pending.popleft()
                    worker.deadline = time.monotonic() + self.timeout_s * len(worker.unit)
                    try:
                        worker.connection.send(([responses[i] for i in worker.unit], [rows[i] for i in worker.unit]))
                    except OSError:  # it died since: its unit goes back to the queue, for a new worker
                        pending.appendleft(worker.unit)
                        self._replace(worker)
                        continue
                    busy[worker.connection] = worker
            if not busy:  # every send failed (workers that died): the new workers take the units next
                continue
            wait_s = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            for connection in multiprocessing.connection.wait(list(busy), timeout=wait_s):
                worker = busy.pop(connection)
                try:
                    answers = connection.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)  # its exit status, for the message
                    how = _how_it_ended(worker.process.exitcode)
                    for item in worker.unit:
                        record_error(f"reward worker (pid {worker.process.pid}) {how} on item {item}")
                    self._replace(worker)
                    continue
                for item, (ok, value) in zip(worker.unit, answers):
                    if ok:
                        result.scores[item] = value
                    else:
                        record_error(f"item {item}: {value}")
                worker.unit = None
            now = time.monotonic()
            for connection, worker in list(busy.items()):
                if worker.deadline <= now:
                    del busy[connection]
                    result.num_timeouts += len(worker.unit)
                    self._replace(worker)
        return result

    def _units(self, count: int) -> list[list[int]]:
        """What one worker scores at a time: one response, or for a batched reward one contiguous chunk
        per worker (sizes differing by at most one)."""
        if not is_batched(self.reward) or count == 0:
            return [[i] for i in range(count)]
        chunks = min(len(self._workers), count)
        bounds = [count * c // chunks for c in range(chunks + 1)]
        return [list(range(bounds[c], bounds[c + 1])) for c in range(chunks)]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        new = self._workers[self._workers.index(worker)] = _Worker(self._context, self.reward)
        return new

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
