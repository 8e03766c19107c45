"""Run one untrusted Python program in a locked-down child process.

What is enforced (``docs/rewards.md`` has the full table), by isolation mode:

* ``"root"`` (the caller is root and ``unshare`` works): new network, PID, mount, IPC and UTS
  namespaces (``unshare --net --pid --ipc --uts --mount-proc --kill-child``); the program runs
  as a per-run unprivileged uid (``UID_BASE + …``, no passwd entry, no groups), so
  ``RLIMIT_NPROC`` is really enforced (the kernel does not apply it to root) and the program can
  read or signal nothing of root's.
* ``"userns"`` (not root, unprivileged user namespaces allowed): the same namespaces inside a
  user namespace (``--map-root-user``). The program keeps the caller's uid outside, so files the
  caller can read stay readable, and ``RLIMIT_NPROC`` counts all of the caller's processes (it is
  set to their current number plus ``max_processes``).
* ``"none"`` (neither works): rlimits, a new session and a scrubbed environment only. **No
  network isolation, no read-only filesystem, and a daemon that calls ``setsid`` can outlive
  the run.** :func:`isolation_mode` tells which mode is in use; CodeReward warns once.

In the namespaced modes every mount is remounted read-only, the world-writable directories
(``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``) are covered by small private tmpfs mounts
that vanish with the run, the program is PID 1 of its own PID namespace (when it exits or is
killed, the kernel kills every process it left), and the network namespace has only a down
loopback device. In every mode: wall-clock limit (the whole process group is SIGKILLed),
``RLIMIT_CPU``, ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE`` (caps stdout, stderr and every
file written), ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, no core dumps, an environment with nothing
but ``PATH``/``HOME``/``TMPDIR``/``LANG``, and a fresh host temp dir (stdin/stdout/stderr files)
removed afterwards. ``setpriv --pdeathsig`` makes ``unshare`` die with the thread that started
it, so killing a reward worker also kills its sandboxes.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

IsolationMode = Literal["root", "userns", "none"]
RunStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "sandbox_error"]

# Per-run uids for root mode: 2**28 + (pid mod 2**22) * 64 + (run counter mod 64). Unique across
# the processes of one machine and across up to 64 concurrent runs of one process, far above any
# real account, and below 2**32 - 1 (the invalid uid).
UID_BASE = 1 << 28
_RUNS_PER_PROCESS = 64
_run_counter = itertools.count()

_BOOT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
_BOOT_FAILURE_STATUS = 125
# How long a killed namespace may take to empty before the launcher is killed as well.
_REAP_TIMEOUT_S = 5.0
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_NAMESPACE_FLAGS = ("--net", "--pid", "--ipc", "--uts", "--mount-proc", "--kill-child")
_SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/work", "TMPDIR": "/tmp/work", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock limit in seconds; at expiry the whole process group is SIGKILLed.
    ``RLIMIT_CPU`` is set one second above it (rounded up)."""
    memory_mb: int = 512
    """Address-space limit (``RLIMIT_AS``) per process, in MiB."""
    output_bytes: int = 4 << 20
    """Largest file the program may write (``RLIMIT_FSIZE``), stdout and stderr included."""
    max_processes: int = 16
    """Process/thread limit (``RLIMIT_NPROC``) for the sandbox uid."""
    max_open_files: int = 64
    """File descriptor limit (``RLIMIT_NOFILE``)."""
    tmpfs_mb: int = 64
    """Size of each private tmpfs (``/tmp`` etc.) in MiB."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run."""

    status: RunStatus
    """``ok`` (exit 0), ``error`` (non-zero exit or signal), ``timeout`` (wall clock or CPU),
    ``memory`` (MemoryError), ``output_limit`` (hit ``output_bytes``), ``sandbox_error`` (the
    sandbox itself could not be set up; the program did not run)."""
    returncode: int
    """Exit status as :class:`subprocess.Popen` reports it (negative: killed by that signal)."""
    stdout: str
    """Standard output, at most ``output_bytes``, decoded as UTF-8 with replacement."""
    stderr: str
    """Standard error, same cap."""
    wall_s: float
    """Seconds from start to reap."""


def _command_works(command: list[str]) -> bool:
    try:
        completed = subprocess.run(command, capture_output=True, timeout=10, env=_SANDBOX_ENV)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0


@functools.cache
def isolation_mode() -> IsolationMode:
    """Which isolation this process gets (probed once by running ``unshare … true``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "none"
    if os.geteuid() == 0 and _command_works([unshare, *_NAMESPACE_FLAGS, "true"]):
        return "root"
    if _command_works([unshare, "--map-root-user", *_NAMESPACE_FLAGS, "true"]):
        return "userns"
    return "none"


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    setpriv = shutil.which("setpriv")
    if setpriv and _command_works([setpriv, "--pdeathsig", "KILL", "true"]):
        return (setpriv, "--pdeathsig", "KILL")
    return ()


def _world_executable(path: str) -> bool:
    """True if a user with no relation to the file's owner can traverse to and run ``path``."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    parent = os.path.dirname(path)
    while parent != "/":
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(parent)
    return True


@functools.cache
def default_python() -> str:
    """The interpreter sandboxed programs run with.

    ``sys.executable`` when the sandbox uid can run it, else the first ``python3`` on the
    system ``PATH`` that it can (e.g. a pyenv interpreter under a private ``/root`` is not
    reachable by the unprivileged per-run uid of root mode, and ``/usr/bin/python3`` is used).
    """
    if isolation_mode() != "root" or _world_executable(sys.executable):
        return os.path.realpath(sys.executable)
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        candidate = os.path.join(directory, "python3")
        if os.path.exists(candidate) and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise RuntimeError(
        f"no Python interpreter is executable by the sandbox uid: {sys.executable} sits in a directory "
        "closed to other users and there is no /usr/bin/python3; pass `python=` explicitly"
    )


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except FileNotFoundError:
                continue
    return count


def _rlimits(limits: SandboxLimits, mode: IsolationMode) -> dict[str, int]:
    nproc = limits.max_processes
    if mode != "root":
        # RLIMIT_NPROC counts every process of the real uid, and here that uid is the caller's.
        nproc += _count_processes_of(os.getuid())
    return {
        "RLIMIT_CPU": math.ceil(limits.timeout_s) + 1,
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_FSIZE": limits.output_bytes,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_CORE": 0,
    }


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a /proc scan: ``/proc/PID/task/*/children`` is optional)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    # Fields after the parenthesised command name: state, ppid, ...
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return children


def _kill_run(launcher: subprocess.Popen, kill_namespace: bool) -> None:
    """SIGKILL what is left of a run and reap it, so that none of it outlives :func:`run_program`.

    ``kill_namespace`` (the run was cut short): kill the namespace's PID 1, the launcher's
    child, and let the launcher reap it. The kernel kills every process of the PID namespace
    and completes PID 1's exit only after they are all gone, and ``unshare`` exits once it has
    reaped PID 1 — so when we have reaped ``unshare``, nothing is left, not even a zombie.
    (Killing ``unshare`` itself would orphan PID 1 to the host's init, which need not reap.)
    A run that ended by itself needs no such step: the namespace emptied when PID 1 exited.
    The launcher's process group is killed last; in "none" mode that is all we can reach.
    """
    if kill_namespace:
        for child in _children_of(launcher.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            launcher.wait(timeout=_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()


def _read_capped(path: str, limit: int) -> tuple[str, int]:
    """(text of at most ``limit`` bytes, size of the file in bytes)."""
    with open(path, "rb") as f:
        data = f.read(limit)
        size = os.fstat(f.fileno()).st_size
    return data.decode("utf-8", errors="replace"), size


def _status(returncode: int, timed_out: bool, stderr: str, hit_output_cap: bool) -> RunStatus:
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    if returncode == _BOOT_FAILURE_STATUS and stderr.startswith("archer-sandbox:"):
        return "sandbox_error"
    if hit_output_cap or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr:
        return "memory"
    return "ok" if returncode == 0 else "error"


def run_program(
    source: str,
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    mode: IsolationMode | None = None,
) -> RunResult:
    """Run the Python program ``source`` with ``stdin`` as standard input, inside the sandbox.

    Args:
        source: the program text (written to ``solution.py`` in the run's work dir).
        stdin: standard input.
        limits: resource limits.
        python: interpreter to exec (``None``: :func:`default_python`); the sandbox uid must be able
            to run it.
        mode: isolation mode; ``None`` means :func:`isolation_mode`. Tests pass ``"userns"`` to
            check the unprivileged path while running as root.
    """
    mode = isolation_mode() if mode is None else mode
    uid = None
    if mode == "root":
        uid = UID_BASE + (os.getpid() % (1 << 22)) * _RUNS_PER_PROCESS + next(_run_counter) % _RUNS_PER_PROCESS
    host_dir = tempfile.mkdtemp(prefix="archer-sandbox-")
    try:
        paths = {name: os.path.join(host_dir, name) for name in ("spec.json", "solution.py", "stdin", "stdout", "stderr")}
        with open(paths["solution.py"], "w", encoding="utf-8") as f:
            f.write(source)
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        namespaced = mode != "none"
        work_dir = "/tmp/work" if namespaced else os.path.join(host_dir, "work")
        spec = {
            "program_path": paths["solution.py"],
            "private_dirs": list(_PRIVATE_DIRS) if namespaced else [],
            "work_dir": work_dir,
            "tmpfs_mb": limits.tmpfs_mb,
            "uid": uid,
            "rlimits": _rlimits(limits, mode),
            "python": default_python() if python is None else python,
            "env": {**_SANDBOX_ENV, "HOME": work_dir, "TMPDIR": work_dir},
            "namespaced": namespaced,
        }
        with open(paths["spec.json"], "w") as f:
            json.dump(spec, f)
        command = [*_pdeathsig_prefix()]
        if namespaced:
            command += ["unshare", *(["--map-root-user"] if mode == "userns" else []), *_NAMESPACE_FLAGS, "--"]
        command += [os.path.realpath(sys.executable), "-I", "-S", _BOOT_SCRIPT, paths["spec.json"]]
        start = time.perf_counter()
        timed_out = False
        with open(paths["stdin"], "rb") as f_in, open(paths["stdout"], "wb") as f_out, open(paths["stderr"], "wb") as f_err:
            process = subprocess.Popen(
                command, stdin=f_in, stdout=f_out, stderr=f_err, env=_SANDBOX_ENV, start_new_session=True
            )
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_run(process, namespaced and timed_out)
        wall_s = time.perf_counter() - start
        stdout, stdout_size = _read_capped(paths["stdout"], limits.output_bytes)
        stderr, stderr_size = _read_capped(paths["stderr"], limits.output_bytes)
        hit_cap = max(stdout_size, stderr_size) >= limits.output_bytes
        return RunResult(_status(process.returncode, timed_out, stderr, hit_cap), process.returncode, stdout, stderr, wall_s)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
