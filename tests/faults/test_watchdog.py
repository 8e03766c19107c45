"""The watchdog (:mod:`archer.watchdog`): a phase past its deadline or stalled generation ends the
process with every thread's stack and one line; nested phases, notes on exceptions, the heartbeat.

In-process tests run the real watching thread with a recorder in place of ``os._exit``; one test
runs it in a real process and checks its exit status. (Runs ended by the watchdog: ``test_ranks.py``.)
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time

import pytest

from archer import watchdog as watchdog_module
from archer.config import WatchdogConfig
from archer.watchdog import EXIT_CODE, Watchdog


class _Exits:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.done = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.done.set()


def _watchdog(**config) -> tuple[Watchdog, io.StringIO, _Exits]:
    out, exits = io.StringIO(), _Exits()
    dog = Watchdog(WatchdogConfig(heartbeat_s=0, **config), out=out, exit=exits, tick_s=0.02)
    return dog, out, exits


def _blocked_in_a_phase(dog: Watchdog, exits: _Exits, name: str, waits_on: str | None) -> None:
    with dog.phase(name, waits_on):
        assert exits.done.wait(30), "the watchdog did not fire"


def test_a_phase_past_its_deadline_writes_every_stack_then_one_line_and_exits_124():
    dog, out, exits = _watchdog(checkpoint_s=0.2)
    helper = threading.Thread(target=lambda: exits.done.wait(30), name="a-helper-thread")
    helper.start()
    dog.start(rank=3, step=lambda: 12)
    try:
        _blocked_in_a_phase(dog, exits, "checkpoint", "the checkpoint /runs/x/last.ckpt")
    finally:
        dog.stop()
        helper.join()
    assert exits.codes == [EXIT_CODE]
    lines = out.getvalue().splitlines()
    summary = ("archer: rank 3 step 12: the checkpoint phase ran past its deadline (watchdog.checkpoint_s = 0.2 s), "
               "waiting on the checkpoint /runs/x/last.ckpt")
    assert lines[0] == summary + "; every thread's stack follows."
    assert lines[-1] == summary + f"; every thread's stack is above. Exiting with code {EXIT_CODE}."
    text = out.getvalue()
    assert "--- thread MainThread ---" in text and "in _blocked_in_a_phase" in text  # where the trainer waits
    assert "--- thread a-helper-thread ---" in text and "--- thread archer-watchdog ---" in text


def test_stalled_generation_ends_the_run_only_after_it_reported_progress():
    dog, out, exits = _watchdog(stall_s=0.2)
    dog.start(rank=0, step=lambda: 4)
    try:
        with dog.phase("rollout", "the in-process vLLM engine"):
            time.sleep(0.5)  # no progress reported yet (e.g. the first step's engine start): no stall
            assert not exits.codes
            watchdog_module.progress()  # what VLLMEngine does after each engine step
            assert exits.done.wait(30)
    finally:
        dog.stop()
    assert re.search(r"archer: rank 0 step 4: generation in the rollout phase made no progress for 0\.2\d* s "
                     r"\(watchdog.stall_s = 0.2 s\), waiting on the in-process vLLM engine", out.getvalue())


def test_nested_phases_notes_and_the_heartbeat():
    dog = Watchdog(WatchdogConfig(), out=io.StringIO(), exit=_Exits())
    dog.start(rank=1, step=lambda: 7)
    try:
        with dog.phase("rollout", "vLLM servers http://h:8000"):
            with watchdog_module.phase("reward", "reward workers (pids 1, 2)"):  # the reward runner's
                assert dog.state(time.monotonic())[::2] == ("reward", "reward workers (pids 1, 2)")
                other = []
                worker = threading.Thread(target=lambda: other.append(watchdog_module.phase("update")))
                worker.start()
                worker.join()
                assert type(other[0]).__name__ == "nullcontext"  # another thread's phases are not tracked
            assert dog.heartbeat_line(time.monotonic()).startswith(
                "[archer watchdog] rank 1 step 7: rollout for 0 s (waits on vLLM servers http://h:8000)")
        assert dog.state(time.monotonic())[0] == "idle"
        with pytest.raises(RuntimeError) as error:
            with dog.phase("update", "the other ranks"), dog.phase("checkpoint"):
                raise RuntimeError("Connection closed by peer")
        assert error.value.__notes__ == ["archer: rank 1 step 7: raised in the checkpoint phase"]  # the innermost
        with pytest.raises(ValueError, match="unknown watchdog phase 'sampling'"):
            with dog.phase("sampling"):
                pass
    finally:
        dog.stop()
    assert watchdog_module._active is None


def test_a_hung_process_exits_124_with_the_line_last(tmp_path):
    """A real process blocked forever in the weight sync phase (as on an NCCL broadcast to a server
    that died) ends by itself."""
    script = (
        "import threading\n"
        "from archer.config import WatchdogConfig\n"
        "from archer.watchdog import Watchdog\n"
        "dog = Watchdog(WatchdogConfig(weight_sync_s=1, heartbeat_s=0.5), tick_s=0.1)\n"
        "dog.start(rank=0, step=lambda: 3)\n"
        "with dog.phase('weight sync', 'vLLM servers http://h:8000'):\n"
        "    threading.Event().wait()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CODE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("archer: rank 0 step 3: the weight sync phase ran past its deadline "
                                "(watchdog.weight_sync_s = 1 s), waiting on vLLM servers http://h:8000")
    assert any(line.startswith("[archer watchdog] rank 0 step 3: weight sync for") for line in lines)
    assert "threading.Event().wait()" in result.stderr or "in wait" in result.stderr


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="model.watchdog.update_s must be >= 0 seconds"):
        WatchdogConfig(update_s=-1)
