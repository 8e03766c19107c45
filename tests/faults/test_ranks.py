"""Fault 3: one of two DDP ranks killed mid-step, or hung mid-step — the other must not wait forever.

Real ``archer fit`` runs of two processes (gloo on CPU), through ``harness.run_subprocess``, which
also fails the test if any process of the run outlives it.
"""

from __future__ import annotations

import re
import signal

import pytest
from fault_probe import CHILD_ENV, report_detection
from harness import args, override_file, run_subprocess

from archer.watchdog import EXIT_CODE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def test_a_rank_killed_mid_step_ends_the_other_with_the_phase_and_rank(tiny_model_dir, tmp_path):
    """SIGKILL of rank 1 before its first backward pass of step 1: rank 0, inside the update's gradient
    all-reduce, gets gloo's "Connection closed by peer" (or "reset by peer") and exits 1; the traceback's last line says
    where it was (the update phase of step 1, on rank 0, waiting on the other ranks). Or, when rank 0
    is slower to unwind than Lightning's child-process observer is to poll, the observer ends it
    (SIGKILL) and says why — either way no wait past a few seconds."""
    kill = {"class_path": "fault_probe.KillRankMidStep", "init_args": {"rank": 1, "step": 1}}
    override = override_file(tmp_path, max_steps=3, every=10, callbacks=[kill])
    code, output = run_subprocess(tmp_path, args(tiny_model_dir, override, *DDP), env=CHILD_ENV, timeout=240)
    report_detection(tmp_path / "output.log", "fault: SIGKILL rank 1")
    if code == -signal.SIGKILL:
        assert "terminated with code -9. Forcefully terminating all other processes" in output, output
        return
    assert code == 1, output
    # The killed peer's socket reads as closed or as reset, depending on when the kernel tore it down.
    assert re.search(r"Connection (closed|reset) by peer", output), output
    assert "archer: rank 0 step 1: raised in the update phase, waiting on the other ranks' collectives (2 ranks)" in output


def test_a_rank_hung_mid_step_ends_the_run_by_the_deadline_with_every_stack(tiny_model_dir, tmp_path):
    """Rank 1 sleeps before its first backward pass of step 1 while rank 0 waits in the all-reduce,
    which has no deadline of its own short of the process group's (30 min): both watchdogs end their
    process at ``watchdog.update_s`` with every thread's stack and the one line, exit code 124."""
    hang = {"class_path": "fault_probe.HangRankMidStep", "init_args": {"rank": 1, "step": 1}}
    override = override_file(tmp_path, max_steps=3, every=10, callbacks=[hang],
                             model={"watchdog": {"update_s": 4, "heartbeat_s": 1}})
    code, _ = run_subprocess(tmp_path, args(tiny_model_dir, override, *DDP), env=CHILD_ENV, timeout=240)
    report_detection(tmp_path / "output.log", "fault: rank 1 hangs")
    output = (tmp_path / "output.log").read_text()
    assert code == EXIT_CODE, output
    for rank in (0, 1):
        assert re.search(rf"archer: rank {rank} step 1: the update phase ran past its deadline \(watchdog.update_s = 4 s\), "
                         r"waiting on the other ranks' collectives \(2 ranks\); every thread's stack is above. "
                         r"Exiting with code 124.", output), output
    assert "--- thread MainThread ---" in output and "in on_before_backward" in output  # the hung rank's stack
    # the waiting rank's: inside autograd's backward (DDP all-reduces there), which the hung rank never entered
    assert "in _engine_run_backward" in output
    assert re.search(r"\[archer watchdog\] rank 0 step 1: update for \d+ s", output)  # the heartbeat
