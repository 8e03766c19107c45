"""Every wait of a run bounded: phases with deadlines, a heartbeat in the log, stacks and exit on a hang.

The trainer marks what it is doing with :meth:`Watchdog.phase` (``with watchdog.phase("rollout",
waits_on=...):``); phases nest (``reward`` inside ``rollout``), and the time outside any phase is
``idle`` (the trainer's own work: loading a batch, logging, Lightning's collectives). A thread checks
every second that no open phase has run past its deadline (:class:`~archer.config.WatchdogConfig`),
and that in-process generation, once it reported progress (:func:`progress`, after every vLLM engine
step or generated token), has not stalled for ``stall_s``. Every ``heartbeat_s`` it writes one line
to the log, which a user can ``tail -f``::

    [archer watchdog] rank 0 step 12: rollout for 34 s (waits on vLLM servers http://h:8000)

A phase past its deadline is a hang that nothing else would end — a collective whose peer died
without closing its socket, a server that accepts and never answers past the HTTP timeouts, an NCCL
broadcast (no timeout of its own), a reward pool or a disk that blocks. The watchdog then writes
every thread's stack to the log and, last, one line::

    archer: rank 1 step 12: the weight sync phase ran past its deadline (watchdog.weight_sync_s = 1800 s),
    waiting on vLLM servers http://h:8000; every thread's stack is above. Exiting with code 124.

and ends the process with :data:`EXIT_CODE` (``os._exit``: the training thread is the one that is
stuck, so nothing can be raised in it; reward workers and launched servers die with their parent).
The last checkpoint is the run's state; resume with ``--ckpt_path last``.

A phase that ends with an exception instead (a collective whose peer closed its socket, a server
that answered with an error) adds one line to its traceback: ``archer: rank 0 step 12: raised in the
update phase, waiting on the other ranks' collectives (2 ranks)``.

Limits: the watchdog is a Python thread, so a hang inside C code that holds the GIL (none of torch's
collectives, vLLM's steps or socket reads do) would stop it too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from archer.config import WatchdogConfig

__all__ = ["EXIT_CODE", "PHASES", "Watchdog", "phase", "progress"]

EXIT_CODE = 124
"""The exit status of a run the watchdog ended (as coreutils' ``timeout``)."""

PHASES = {
    "rollout": "rollout_s",
    "reward": "reward_s",
    "old log-probs": "logprob_s",
    "update": "update_s",
    "weight sync": "weight_sync_s",
    "checkpoint": "checkpoint_s",
    "validation": "validation_s",
    "idle": "idle_s",
}
"""Each phase and the :class:`~archer.config.WatchdogConfig` field of its deadline."""

_active: Watchdog | None = None


def progress() -> None:
    """Report that in-process generation advanced (one engine step, one token); a no-op without a
    running watchdog. Any thread may call it."""
    watchdog = _active
    if watchdog is not None:
        watchdog.beat()


def phase(name: str, waits_on: str | None = None) -> contextlib.AbstractContextManager:
    """A phase of the running watchdog, nested in the current one, when called from the thread it
    watches (a component deep in the step, e.g. the reward runner); a no-op anywhere else."""
    watchdog = _active
    if watchdog is None or threading.get_ident() != watchdog.owner:
        return contextlib.nullcontext()
    return watchdog.phase(name, waits_on)


def _note_phase(error: Exception, note: str) -> None:
    """Add the innermost phase an exception left to its traceback (once: the outer phases it crosses
    keep the first note)."""
    if any(n.startswith("archer: rank") for n in getattr(error, "__notes__", [])):
        return
    error.add_note(note)


@dataclass
class _Open:
    name: str
    started: float
    waits_on: str | None


class Watchdog:
    """Phase deadlines, the stall rule and the heartbeat of one process (module docstring).

    Args:
        config: The deadlines; None: phases are tracked but nothing is checked or logged.
        out: Where the heartbeat, the stacks and the final line go.
        exit: Ends the process (``os._exit``; tests pass a recorder).
        tick_s: Seconds between two checks.
    """

    def __init__(self, config: WatchdogConfig | None, *, out: TextIO | None = None,
                 exit: Callable[[int], None] = os._exit, tick_s: float = 1.0) -> None:
        self.config = config
        self.out = out
        self.exit = exit
        self.tick_s = tick_s
        self.owner: int | None = None
        """The thread whose phases are tracked (the one that called :meth:`start`)."""
        self.rank, self.world_size = 0, 1
        self.step: Callable[[], int] = lambda: 0
        self._open: list[_Open] = []
        self._idle_since = time.monotonic()
        self._last_beat: float | None = None  # since the current phase began: None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the trainer's side
    def start(self, rank: int, step: Callable[[], int], world_size: int = 1) -> None:
        """Watch the calling thread's phases (idempotent); ``step()`` gives the step for messages. With
        several ranks, a phase that names nothing it waits on waits on the other ranks' collectives."""
        global _active
        if self._thread is not None:
            return
        self.rank, self.step, self.world_size, self.owner = rank, step, world_size, threading.get_ident()
        with self._lock:
            self._open, self._idle_since, self._last_beat = [], time.monotonic(), None
        _active = self
        if self.config is None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="archer-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent): the run ended, normally or with an exception."""
        global _active
        if _active is self:
            _active = None
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    @contextlib.contextmanager
    def phase(self, name: str, waits_on: str | None = None) -> Iterator[None]:
        """Inside, the process is in phase ``name`` (one of :data:`PHASES`), waiting on ``waits_on``
        (a server, the other ranks, a folder) if anything."""
        if name not in PHASES:
            raise ValueError(f"unknown watchdog phase {name!r}; one of {list(PHASES)}")
        if waits_on is None and self.world_size > 1:
            waits_on = f"the other ranks' collectives ({self.world_size} ranks)"
        with self._lock:
            self._open.append(_Open(name, time.monotonic(), waits_on))
            self._last_beat = None
        try:
            yield
        except Exception as err:
            _note_phase(err, f"archer: rank {self.rank} step {self.step()}: raised in the {name} phase"
                        + (f", waiting on {waits_on}" if waits_on else ""))
            raise
        finally:
            with self._lock:
                self._open.pop()
                now = time.monotonic()
                if self._open:  # the enclosing phase goes on; its stall clock restarts
                    self._last_beat = None
                else:
                    self._idle_since, self._last_beat = now, None

    def beat(self) -> None:
        """In-process generation advanced (see :func:`progress`)."""
        self._last_beat = time.monotonic()

    # ------------------------------------------------------------------ the watching thread
    def state(self, now: float) -> tuple[str, float, str | None]:
        """The innermost phase, the seconds spent in it, and what it waits on."""
        with self._lock:
            if not self._open:
                return "idle", now - self._idle_since, None
            inner = self._open[-1]
            return inner.name, now - inner.started, inner.waits_on

    def overdue(self, now: float) -> str | None:
        """Why the run must end now (a phase past its deadline, or stalled generation), or None."""
        config = self.config
        if config is None:
            return None
        with self._lock:
            opened = list(self._open) or [_Open("idle", self._idle_since, None)]
            last_beat = self._last_beat
        waits_on = next((p.waits_on for p in reversed(opened) if p.waits_on), None)
        on = f", waiting on {waits_on}" if waits_on else ""
        for open_phase in opened:
            field = PHASES[open_phase.name]
            deadline = getattr(config, field)
            if deadline and now - open_phase.started > deadline:
                inner = f" (in {opened[-1].name})" if opened[-1] is not open_phase else ""
                return (f"the {open_phase.name} phase{inner} ran past its deadline (watchdog.{field} = "
                        f"{deadline:g} s){on}")
        if config.stall_s and last_beat is not None and now - last_beat > config.stall_s:
            return (f"generation in the {opened[-1].name} phase made no progress for {now - last_beat:.3g} s "
                    f"(watchdog.stall_s = {config.stall_s:g} s){on}")
        return None

    def heartbeat_line(self, now: float) -> str:
        name, seconds, waits_on = self.state(now)
        on = f" (waits on {waits_on})" if waits_on else ""
        return f"[archer watchdog] rank {self.rank} step {self.step()}: {name} for {seconds:.0f} s{on}"

    def _run(self) -> None:
        assert self.config is not None
        next_beat = time.monotonic() + self.config.heartbeat_s
        while not self._stopping.wait(self.tick_s):
            now = time.monotonic()
            try:
                reason = self.overdue(now)
                if reason is None and self.config.heartbeat_s and now >= next_beat:
                    self._write(self.heartbeat_line(now))
                    next_beat = now + self.config.heartbeat_s
            except Exception as error:  # noqa: BLE001 - a watchdog that died silently would bound nothing
                self._write(f"[archer watchdog] rank {self.rank}: {type(error).__name__}: {error} (still watching)")
                continue
            if reason is not None:
                self._expire(reason)
                return

    def _expire(self, reason: str) -> None:
        """Every thread's stack, then the one line, then the exit."""
        line = f"archer: rank {self.rank} step {self.step()}: {reason}"
        self._write(line + "; every thread's stack follows.")
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            stack = "".join(traceback.format_stack(frame))
            self._write(f"--- thread {names.get(ident, ident)} ---\n{stack.rstrip()}")
        self._write(f"{line}; every thread's stack is above. Exiting with code {EXIT_CODE}.")
        self.exit(EXIT_CODE)

    def _write(self, text: str) -> None:
        out = self.out or sys.stderr
        with contextlib.suppress(Exception):  # a closed stream must not keep the watchdog from exiting
            print(text, file=out, flush=True)
