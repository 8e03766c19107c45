"""RewardRunner: errors and hangs (Python-level and C-level) score 0, are counted, and the batch goes on."""

import ctypes

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
        result = runner.score(responses, [{}] * len(responses))  # returns at all: the hangs were killed
        # Killed workers were replaced: the runner still works.
        assert runner.score(["0.75"], [{}]).scores == [0.75]
    assert result.scores == [0.25, 0.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    assert result.num_errors == 2  # "raise" and "crash"
    assert result.num_timeouts == 2  # "spin" and "c-hang"
    assert "ValueError: bad row" in result.errors[0]


def test_rejects_mismatched_lengths():
    with RewardRunner(ExactMatchReward(), num_workers=1) as runner, pytest.raises(ValueError, match="2 responses but 1 rows"):
        runner.score(["a", "b"], [{"answer": "a"}])


class _ReturnsAsIs:
    """A reward that returns whatever the row holds under "value"."""

    def __call__(self, response: str, row: dict) -> float:
        return row["value"]


def test_non_finite_and_non_numeric_rewards_are_errors_scored_zero():
    """NaN would make its whole group's advantages NaN, inf too, and a string is a reward bug:
    each scores 0 and is counted as an error with its message; numbers of any numeric type pass."""
    values = [float("nan"), float("inf"), -float("inf"), "0.7", None, True, 2, 0.5]
    with RewardRunner(_ReturnsAsIs(), timeout_s=5.0, num_workers=1) as runner:
        result = runner.score(["r"] * len(values), [{"value": v} for v in values])
    assert result.scores == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.5]
    assert result.num_errors == 5 and result.num_timeouts == 0
    assert "reward returned nan, expected a finite number" in result.errors[0]
    assert "reward returned inf" in result.errors[1]
    assert "reward returned str '0.7', expected a number" in result.errors[3]
    assert "reward returned NoneType None" in result.errors[4]
