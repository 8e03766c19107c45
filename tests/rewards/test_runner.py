"""RewardRunner: errors and hangs (Python-level and C-level) score 0, are counted, and the batch goes on."""

import ctypes
import time

import pytest

from archer.rewards import ExactMatchReward, RewardRunner


class _Misbehaving:
    """A reward whose behaviour is chosen by the response text."""

    def __call__(self, response: str, row: dict) -> float:
        if response == "raise":
            raise ValueError("bad row")
        if response == "spin":
            while True:
                pass
        if response == "c-hang":
            ctypes.CDLL(None).pause()  # blocks in C: no Python signal handler can run
        if response == "crash":
            ctypes.string_at(0)  # segfault kills the worker process
        return float(response)


def test_scores_keep_input_order():
    with RewardRunner(ExactMatchReward(), timeout_s=5.0, num_workers=2) as runner:
        result = runner.score(["a", "b", "c", "x"], [{"answer": "a"}, {"answer": "x"}, {"answer": "c"}, {"answer": "x"}])
    assert result.scores == [1.0, 0.0, 1.0, 1.0]
    assert (result.num_errors, result.num_timeouts) == (0, 0)


def test_errors_and_hangs_score_zero_and_are_counted():
    responses = ["0.25", "raise", "spin", "0.5", "c-hang", "crash", "1.0"]
    with RewardRunner(_Misbehaving(), timeout_s=0.5, num_workers=2) as runner:
        start = time.perf_counter()
        result = runner.score(responses, [{}] * len(responses))
        elapsed = time.perf_counter() - start
        # Killed workers were replaced: the runner still works.
        assert runner.score(["0.75"], [{}]).scores == [0.75]
    assert result.scores == [0.25, 0.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    assert result.num_errors == 2  # "raise" and "crash"
    assert result.num_timeouts == 2  # "spin" and "c-hang"
    assert "ValueError: bad row" in result.errors[0]
    assert elapsed < 3.0  # two 0.5 s timeouts on two workers, not a stuck batch


def test_rejects_mismatched_lengths():
    with RewardRunner(ExactMatchReward(), num_workers=1) as runner, pytest.raises(ValueError, match="2 responses but 1 rows"):
        runner.score(["a", "b"], [{"answer": "a"}])
