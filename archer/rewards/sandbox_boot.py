"""Sandbox bootstrap: runs as PID 1 of fresh namespaces, locks itself down, then execs the program.

This file is executed as a script (``python -I -S sandbox_boot.py SPEC``) by
:func:`archer.rewards.sandbox.run_program`, inside ``unshare --net --pid --ipc --uts
--mount-proc --kill-child`` (plus ``--map-root-user`` when the caller is not root). It must stay
standard-library only and fast: it is on the path of every test case.

Order matters, each step needs the privileges the next one drops:
1. read the spec and the program (they live in the host temp dir, about to be hidden);
2. ``setsid`` so that ``kill(0, ...)`` from the program cannot reach ``unshare`` outside;
3. remount every mount read-only, then cover the world-writable directories with small
   private tmpfs mounts (so nothing written survives the run), create the work dir;
4. set the rlimits, drop to the per-run uid (root mode), re-arm the parent-death signal
   (the kernel clears it when credentials change);
5. exec the interpreter on the program with a scrubbed environment.
Any failure before the exec exits with status 125 and a line starting ``archer-sandbox:``.
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
PR_SET_PDEATHSIG = 1
BOOT_FAILURE_STATUS = 125

# Per-mount flags that an unprivileged user namespace may not clear on a "locked" mount, so a
# read-only remount must repeat them.
_KEPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Kernel pseudo-filesystems: /proc is freshly mounted for the new PID namespace, /dev holds
# /dev/null & co. that must stay writable, /sys is never writable by the sandbox uid.
_NOT_REMOUNTED = ("/proc", "/sys", "/dev")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _unescape_mountinfo(path: str) -> str:
    """Mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        path = path.replace(code, chr(int(code[1:], 8)))
    return path


def _remount_all_readonly() -> None:
    with open("/proc/self/mountinfo") as f:
        lines = f.readlines()
    for line in lines:
        fields = line.split()
        mount_point, options = _unescape_mountinfo(fields[4]), fields[5].split(",")
        if mount_point.startswith(_NOT_REMOUNTED) or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= _KEPT_FLAGS.get(option, 0)
        _mount(None, mount_point, None, flags, None)


def _boot(spec: dict) -> None:
    with open(spec["program_path"], "rb") as f:
        program = f.read()
    if os.getsid(0) != os.getpid():  # in "none" mode Popen already made us a session leader
        os.setsid()
    if spec["namespaced"]:
        _remount_all_readonly()
    for directory in spec["private_dirs"]:
        if os.path.isdir(directory):
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    work_dir = spec["work_dir"]
    os.mkdir(work_dir, 0o700)
    program_path = os.path.join(work_dir, "solution.py")
    with open(program_path, "wb") as f:
        f.write(program)
    uid = spec["uid"]
    if uid is not None:
        os.chown(work_dir, uid, uid)
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.chdir(work_dir)
    python = spec["python"]
    # -I: ignore PYTHON* variables and the user site dir, and keep the script's dir off sys.path;
    # -B: write no .pyc (the tree is read-only anyway).
    os.execve(python, [python, "-I", "-B", program_path], spec["env"])


def main() -> None:
    try:
        with open(sys.argv[1]) as f:
            spec = json.load(f)
        _boot(spec)
    except BaseException as error:  # noqa: BLE001 - any failure must fail closed, never run the program
        sys.stderr.write(f"archer-sandbox: {type(error).__name__}: {error}\n")
        sys.stderr.flush()
        os._exit(BOOT_FAILURE_STATUS)


if __name__ == "__main__":
    main()
