"""Hostile programs are contained, fail, and leave the host as it was; honest ones run."""

import os
import socket
import textwrap

import pytest

from archer.rewards.sandbox import SandboxLimits, isolation_mode, run_program

# Root mode implies unprivileged user namespaces work too, so both paths are tested as root.
MODES = {"root": ["root", "userns"], "userns": ["userns"], "none": []}[isolation_mode()]
pytestmark = pytest.mark.skipif(not MODES, reason="no namespace isolation on this machine (mode 'none')")
SHORT = SandboxLimits(timeout_s=3.0)  # hostile tests end long before; margin for a loaded CPU


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def test_honest_program_reads_stdin(mode, no_leftovers):
    result = run_program("a, b = map(int, input().split())\nprint(a + b)", "2 3\n", SHORT, mode=mode)
    assert (result.status, result.stdout) == ("ok", "5\n")


def test_infinite_loop_is_killed_at_the_wall_clock(mode, no_leftovers):
    result = run_program("while True:\n    pass", "", SandboxLimits(timeout_s=1.0), mode=mode)
    # killed by the wall-clock limit (how promptly is measured in benchmarks/bench_rewards.py)
    assert result.status == "timeout"
    assert result.wall_s >= 1.0


def test_fork_bomb_is_capped_and_cleaned_up(mode, no_leftovers):
    source = textwrap.dedent(f"""
        import os, time
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    os.execv("/bin/sleep", ["sleep", "1000", "{no_leftovers}"])
                children += 1
            except OSError:
                print("capped at", children, flush=True)
                time.sleep(100)
    """)
    result = run_program(source, "", SandboxLimits(timeout_s=1.5), mode=mode)
    assert result.status == "timeout"
    if mode == "userns" and os.getuid() == 0:
        return  # the kernel never applies RLIMIT_NPROC to uid 0, even inside a user namespace
    capped = int(result.stdout.split()[-1])
    bound = SHORT.max_processes + (0 if mode == "root" else len(os.listdir("/proc")))
    assert 0 < capped <= bound


def test_memory_bomb_fails(mode, no_leftovers):
    result = run_program("blocks = [bytearray(256 << 20)]\nblocks.append(bytearray(8 << 30))", "", SHORT, mode=mode)
    assert result.status == "memory"


def test_writes_outside_the_work_dir_do_not_reach_the_host(mode, no_leftovers, tmp_path):
    targets = [str(tmp_path / "pwned"), f"/tmp/{no_leftovers}", f"/work/{no_leftovers}", os.path.join(os.getcwd(), no_leftovers)]
    source = textwrap.dedent(f"""
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                print("wrote", path)
            except OSError as error:
                print("refused", path, error.errno)
    """)
    result = run_program(source, "", SHORT, mode=mode)
    assert result.status == "ok"
    for path in targets:
        assert not os.path.exists(path), path


def test_parent_environment_is_invisible(mode, no_leftovers, monkeypatch):
    secret = f"s3cret-{os.urandom(8).hex()}"
    monkeypatch.setenv("ARCHER_TEST_SECRET", secret)
    source = textwrap.dedent(f"""
        import os
        print(dict(os.environ))
        for pid in ("1", "{os.getpid()}", str(os.getppid())):
            try:
                print(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as error:
                print("refused", pid, error.errno)
    """)
    result = run_program(source, "", SHORT, mode=mode)
    assert result.status == "ok"
    assert secret not in result.stdout
    assert "ARCHER_TEST_SECRET" not in result.stdout


def test_no_network_even_to_localhost(mode, no_leftovers):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        result = run_program(source, "", SHORT, mode=mode)
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    assert result.status == "error"
    assert "connected" not in result.stdout


def test_daemon_does_not_outlive_the_run(mode, no_leftovers):
    source = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "1000", "{no_leftovers}"])
            os._exit(0)
        time.sleep(0.3)  # the daemon is running when the program exits
        print("bye")
    """)
    result = run_program(source, "", SHORT, mode=mode)
    assert (result.status, result.stdout) == ("ok", "bye\n")
    # the no_leftovers fixture checks the daemon is gone


def test_killing_its_parent_fails(mode, no_leftovers):
    source = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as error:
                print("refused", pid, error.errno)
        print("survived")
    """)
    result = run_program(source, "", SHORT, mode=mode)
    # From inside its PID namespace the program sees neither its parent (getppid() is 0, and
    # kill(0) hits only its own new session) nor the test process (pid unknown there: ESRCH = 3),
    # and kill(-1) finds no other process.
    assert result.status == "ok"
    assert f"refused {os.getpid()} 3" in result.stdout and "survived" in result.stdout
    os.kill(os.getpid(), 0)  # and the test process is alive


def test_gigabytes_of_output_are_cut(mode, no_leftovers):
    source = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(chunk)"
    result = run_program(source, "", SHORT, mode=mode)
    assert result.status == "output_limit"
    assert len(result.stdout) <= SHORT.output_bytes


def test_root_mode_runs_as_an_unprivileged_uid(no_leftovers):
    if isolation_mode() != "root":
        pytest.skip("root mode only")
    result = run_program("import os\nprint(os.getuid(), os.getgid(), os.getgroups())", "", SHORT)
    uid, gid, groups = result.stdout.split(maxsplit=2)
    assert int(uid) != 0 and int(gid) != 0 and groups.strip() == "[]"
