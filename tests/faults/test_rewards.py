"""Fault 6: a reward worker killed by the kernel (SIGKILL, as the out-of-memory killer does) or one
that never returns — real worker processes of :class:`archer.rewards.RewardRunner`. (Python- and
C-level hangs and a segfault: ``tests/rewards/test_runner.py``.)"""

from __future__ import annotations

import os
import signal
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
