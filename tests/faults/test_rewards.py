"""Fault 6: a reward worker killed by the kernel (SIGKILL, as the out-of-memory killer does) or one
that never returns — real worker processes of :class:`archer.rewards.RewardRunner`. (Python- and
C-level hangs and a segfault: ``tests/rewards/test_runner.py``.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from archer.rewards import RewardRunner


class _Faulty:
    """Dies by SIGKILL on "oom" (what the kernel sends a process over its memory limit), sleeps forever
    on "never", scores the number otherwise."""

    def __call__(self, response: str, row: dict) -> float:
        if response == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        if response == "never":
            time.sleep(3600)
        return float(response)


def test_a_killed_or_silent_worker_scores_zero_is_counted_and_replaced():
    responses = ["0.5", "oom", "never", "1.0"]
    with RewardRunner(_Faulty(), timeout_s=1.0, num_workers=2) as runner:
        pids = {worker.process.pid for worker in runner._workers}
        result = runner.score(responses, [{}] * len(responses))
        assert runner.score(["0.25", "0.75"], [{}, {}]).scores == [0.25, 0.75]  # replaced workers serve
        assert pids.isdisjoint(worker.process.pid for worker in runner._workers)
    assert result.scores == [0.5, 0.0, 0.0, 1.0]
    assert (result.num_errors, result.num_timeouts) == (1, 1)
    assert "was killed by SIGKILL (the kernel's out-of-memory killer sends it) on item 1" in result.errors[0]


def test_a_worker_killed_while_idle_is_replaced_before_the_next_batch():
    """The out-of-memory killer (or SLURM's SIGKILL to the job's processes) can hit a worker between
    batches: the next batch is scored by a new worker, not stopped by a broken pipe."""
    with RewardRunner(_Faulty(), timeout_s=5.0, num_workers=2) as runner:
        idle = runner._workers[0].process
        os.kill(idle.pid, signal.SIGKILL)
        idle.join(timeout=5)
        result = runner.score(["0.5", "1.0", "0.25"], [{}] * 3)
        assert idle.pid not in {worker.process.pid for worker in runner._workers}
    assert result.scores == [0.5, 1.0, 0.25] and result.num_errors == 0


def test_workers_ignore_sigterm_so_the_trainer_can_finish_its_step():
    with RewardRunner(_Faulty(), timeout_s=5.0, num_workers=1) as runner:
        worker = runner._workers[0].process
        assert runner.score(["0.25"], [{}]).scores == [0.25]  # its loop runs: its signal handlers are set
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert worker.is_alive()
        assert runner.score(["0.5"], [{}]).scores == [0.5]


def test_a_process_that_never_closed_its_runner_still_exits():
    """An error or an interrupt can end the trainer without ``close()``: at exit multiprocessing would
    SIGTERM the (daemonic) workers, which ignore it, and wait for them forever; archer kills them first."""
    code = ("from archer.rewards import RewardRunner\n"
            "runner = RewardRunner(lambda response, row: 1.0, num_workers=2)\n"
            "assert runner.score(['a'], [{}]).scores == [1.0]\n"
            "print('scored', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "scored" in done.stdout, done.stderr
