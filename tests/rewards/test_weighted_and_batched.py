"""``WeightedSum`` (hand-computed sums, from Python and from YAML) and batched rewards in the
``RewardRunner`` (one call per chunk, per-chunk failures, per-item non-finite scores)."""

import math
import os
import time
from pathlib import Path

import pytest
import yaml

from archer.rewards import BatchedReward, ExactMatchReward, RewardRunner, WeightedSum, is_batched

ROOT = Path(__file__).resolve().parents[2]


class CharCount:
    """Per item: the number of ``c`` in the response."""

    def __init__(self, char: str = "x") -> None:
        self.char = char

    def __call__(self, response: str, row: dict) -> float:
        return float(response.count(self.char))


class ChunkProbe(BatchedReward):
    """Batched: every response of a call scores the call's size; "raise" fails its call; "nan" is NaN;
    "sleep" sleeps ``sleep_s``."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def score_batch(self, responses: list[str], rows: list[dict]) -> list[float]:
        if "raise" in responses:
            raise RuntimeError("scoring service answered 503")
        if "sleep" in responses:
            time.sleep(self.sleep_s)
        return [math.nan if r == "nan" else float(len(responses)) for r in responses]


class Pids(BatchedReward):
    """Batched: the worker's process id, so the test sees which responses went to which worker."""

    def score_batch(self, responses: list[str], rows: list[dict]) -> list[float]:
        return [float(os.getpid())] * len(responses)


def test_weighted_sum_by_hand():
    rows = [{"answer": "7"}, {"answer": "7"}, {"answer": "3"}]
    responses = ["7", "7xx", "3x"]
    reward = WeightedSum([(ExactMatchReward(), 1.0), (CharCount("x"), -0.25)])
    # exact match 1, 0, 0 (the second is "7xx"); x count 0, 2, 1
    expected = [1.0 - 0.25 * 0, 0.0 - 0.25 * 2, 0.0 - 0.25 * 1]
    assert [reward(r, row) for r, row in zip(responses, rows)] == expected
    assert not is_batched(reward)
    with RewardRunner(reward, timeout_s=5.0, num_workers=2) as runner:
        assert runner.score(responses, rows).scores == expected


def test_weighted_sum_with_a_batched_term_is_batched_and_sums_by_hand():
    reward = WeightedSum([(CharCount("a"), 2.0), (ChunkProbe(), 0.5)])
    assert is_batched(reward)
    # one chunk of 3: the probe scores 3 each; "a" counts 1, 0, 2
    assert reward.score_batch(["a", "b", "aa"], [{}] * 3) == [2.0 + 1.5, 0.0 + 1.5, 4.0 + 1.5]
    assert reward("aa", {}) == 4.0 + 0.5  # one response: a chunk of one


class RaisesOn:
    """Per item: raises on ``bad``, else 1."""

    def __init__(self, bad: str = "bad") -> None:
        self.bad = bad

    def __call__(self, response: str, row: dict) -> float:
        if response == self.bad:
            raise KeyError("row['answer']")
        return 1.0


def test_a_per_item_term_that_raises_in_a_batched_sum_fails_only_its_response():
    reward = WeightedSum([(RaisesOn(), 1.0), (ChunkProbe(), 1.0)])
    with RewardRunner(reward, timeout_s=5.0, num_workers=1) as runner:  # one worker: one chunk of 3
        result = runner.score(["ok", "bad", "ok"], [{}] * 3)
    assert result.scores == [1.0 + 3.0, 0.0, 1.0 + 3.0] and result.num_errors == 1
    assert result.errors[0].endswith("item 1: KeyError: \"row['answer']\"")  # the term's own error, not a NaN


def test_weighted_sum_refuses_bad_terms():
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])
    with pytest.raises(ValueError, match="term 1: weight must be a finite number, got nan"):
        WeightedSum([(CharCount(), 1.0), (CharCount(), math.nan)])


def test_weighted_sum_from_yaml_in_archer_fit(tiny_model_dir, capsys, tmp_path):
    """The YAML form of the docstring, through the CLI's parser, instantiated."""
    from archer.cli import ArcherCLI
    from archer.data import PromptDataModule
    from archer.module import ArcherModule

    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"model": {"reward": {
        "class_path": "archer.rewards.WeightedSum",
        "init_args": {"terms": [
            [{"class_path": "archer.rewards.ExactMatchReward"}, 1.0],
            [{"class_path": "archer.rewards.MathReward", "init_args": {"timeout_s": 2.0}}, 0.5],
        ]},
    }}}))
    cli = ArcherCLI(ArcherModule, PromptDataModule, run=False,
                    args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config),
                          f"--model.model_path={tiny_model_dir}"])
    terms = cli.model.reward.terms
    assert [(type(r).__name__, w) for r, w in terms] == [("ExactMatchReward", 1.0), ("MathReward", 0.5)]
    assert terms[1][0].timeout_s == 2.0


def test_runner_calls_a_batched_reward_once_per_worker_chunk():
    responses = [f"r{i}" for i in range(10)]
    with RewardRunner(ChunkProbe(), timeout_s=5.0, num_workers=3) as runner:
        result = runner.score(responses, [{}] * 10)
    assert result.scores == [3.0] * 3 + [3.0] * 3 + [4.0] * 4  # contiguous chunks 0-2, 3-5, 6-9 (10 * c // 3)
    with RewardRunner(Pids(), timeout_s=5.0, num_workers=2) as runner:
        pids = runner.score(responses, [{}] * 10).scores
    assert len(set(pids[:5])) == 1 and len(set(pids[5:])) == 1 and pids[0] != pids[5]


def test_a_failing_chunk_scores_zero_and_counts_each_response():
    responses = ["a", "raise", "b", "c", "nan", "d"]
    with RewardRunner(ChunkProbe(), timeout_s=5.0, num_workers=2) as runner:
        result = runner.score(responses, [{}] * 6)
    # chunk 0-2 raised: 3 errors; chunk 3-5 scored 3 each, but "nan" alone is an error
    assert result.scores == [0.0, 0.0, 0.0, 3.0, 0.0, 3.0]
    assert result.num_errors == 4 and result.num_timeouts == 0
    # the two chunks answer in either order
    assert sum("RuntimeError: scoring service answered 503" in error for error in result.errors) == 3
    assert sum("item 4: ValueError: reward returned nan" in error for error in result.errors) == 1


def test_a_chunk_gets_its_size_times_the_timeout():
    """A chunk of 2 gets 2 × 1 s: a 1.2 s call (longer than one response's limit) finishes; one of
    4 s is killed (2 timeouts)."""
    with RewardRunner(ChunkProbe(sleep_s=1.2), timeout_s=1.0, num_workers=1) as runner:
        assert runner.score(["sleep", "a"], [{}] * 2).scores == [2.0, 2.0]
    with RewardRunner(ChunkProbe(sleep_s=4.0), timeout_s=1.0, num_workers=1) as runner:
        result = runner.score(["sleep", "a"], [{}] * 2)
        assert (result.scores, result.num_timeouts) == ([0.0, 0.0], 2)
        assert runner.score(["a"], [{}]).scores == [1.0]  # the killed worker was replaced
