"""Rewards grade only the text after ``</think>`` (whole text without it); RoutedReward routes by data_source."""

import pickle
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from archer.rewards import CodeReward, ExactMatchReward, MathReward, Reward, RewardRunner, RoutedReward
from archer.rewards.reasoning import after_thinking

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_ROW = {"tests": [{"input": "2 3\n", "output": "5\n"}], "data_source": "toy_code"}


def test_after_thinking_takes_the_text_after_the_last_marker():
    assert after_thinking("<think>a</think>b</think>c", "</think>") == "c"
    assert after_thinking("no marker", "</think>") == "no marker"
    assert after_thinking("<think>a</think>b", None) == "<think>a</think>b"


def test_math_grades_after_the_marker_when_present():
    response = "<think>maybe \\boxed{7}?</think>So the answer is \\boxed{8}."
    assert MathReward()(response, {"answer": "8"}) == 1.0
    assert MathReward()(response, {"answer": "7"}) == 0.0
    # a boxed guess inside the thinking, nothing after the marker: no answer at all
    assert MathReward()("<think>\\boxed{7}</think>I am not sure.", {"answer": "7"}) == 0.0
    # marker absent (cut mid-thought): the whole text is graded, as the official reward does
    assert MathReward()("<think>so it is \\boxed{7}", {"answer": "7"}) == 1.0
    # think_end=None: always the whole text (the last boxed is inside the thinking here)
    assert MathReward(think_end=None)("<think>\\boxed{7}</think>I am not sure.", {"answer": "7"}) == 1.0
    # a custom marker
    assert MathReward(think_end="[END]")("\\boxed{1} [END] \\boxed{2}", {"answer": "2"}) == 1.0
    assert MathReward().extract_answer("<think>\\boxed{1}</think> $1,000$ is \\boxed{1,000}", {}) == "1000"


def test_code_and_exact_match_grade_after_the_marker():
    code = CodeReward(timeout_s=5.0)
    assert code("<think>draft</think>" + ADD, ADD_ROW) == 1.0
    # the program is only in the thinking: what follows the marker is not a program
    assert code("<think>" + ADD + "</think>done", ADD_ROW) == 0.0
    assert code(ADD, ADD_ROW) == 1.0  # no marker: the whole response
    assert ExactMatchReward()("<think>x</think> 42\n", {"answer": "42"}) == 1.0
    assert ExactMatchReward(think_end=None)("<think>x</think> 42\n", {"answer": "42"}) == 0.0


def test_code_reward_reads_tests_from_another_key():
    row = {"answer": '[{"input": "2 3", "output": "5", "testtype": "stdin"}]'}  # verl: ground_truth holds tests
    assert CodeReward(timeout_s=5.0, tests_key="answer")(ADD, row) == 1.0
    with pytest.raises(KeyError, match="row\\['tests'\\]"):
        CodeReward()(ADD, row)


def _routed() -> RoutedReward:
    return RoutedReward({"toy_math": MathReward(), "aime*": MathReward(fallback=False), "toy_*": CodeReward(timeout_s=5.0)})


def test_routes_exact_names_before_patterns_in_order():
    reward = _routed()
    assert reward.route("toy_math") is reward.routes["toy_math"]  # exact beats the "toy_*" pattern
    assert reward.route("toy_code") is reward.routes["toy_*"]
    assert reward.route("aime25") is reward.routes["aime*"]
    assert reward("\\boxed{4}", {"answer": "4", "data_source": "toy_math"}) == 1.0
    assert reward(ADD, ADD_ROW) == 1.0
    assert reward.extract_answer("\\boxed{4}", {"data_source": "aime24"}) == "4"
    assert reward.extract_answer(ADD, ADD_ROW) is None  # CodeReward extracts no answer


def test_unknown_sources_fail_at_start_up_and_at_call():
    reward = _routed()
    reward.check_data_sources(["toy_math", "aime24", "toy_code", "toy_math"])
    with pytest.raises(ValueError, match=r"no route for data_source \['gsm8k', 'lcb'\]"):
        reward.check_data_sources(["toy_math", "gsm8k", "lcb", "gsm8k"])
    with pytest.raises(KeyError, match="no RoutedReward route for data_source 'gsm8k'"):
        reward("\\boxed{1}", {"answer": "1", "data_source": "gsm8k"})
    with pytest.raises(KeyError, match="row\\['data_source'\\]"):
        reward("\\boxed{1}", {"answer": "1"})
    with pytest.raises(ValueError, match="at least one route"):
        RoutedReward({})


def test_picklable_and_scored_in_reward_worker_processes():
    reward = pickle.loads(pickle.dumps(_routed()))
    assert isinstance(reward, Reward)
    rows = [{"answer": "4", "data_source": "toy_math"}, ADD_ROW, {"answer": "5", "data_source": "nowhere"}]
    with RewardRunner(reward, timeout_s=30.0, num_workers=2) as runner:
        result = runner.score(["\\boxed{4}", ADD, "\\boxed{5}"], rows)
    assert result.scores == [1.0, 1.0, 0.0]
    assert result.num_errors == 1 and "no RoutedReward route" in result.errors[0]


ROUTED_YAML = """
reward:
  class_path: archer.rewards.RoutedReward
  init_args:
    routes:
      math: {class_path: archer.rewards.MathReward}
      "lcb*": {class_path: archer.rewards.CodeReward, init_args: {timeout_s: 6.0, think_end: null}}
"""


def test_yaml_form_instantiates_through_jsonargparse():
    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward | None)  # the type of ArcherModule's `reward`
    reward = parser.instantiate(parser.parse_object(yaml.safe_load(ROUTED_YAML))).reward
    assert isinstance(reward, RoutedReward)
    assert isinstance(reward.routes["math"], MathReward)
    assert isinstance(reward.route("lcb_v5"), CodeReward)
    assert (reward.route("lcb_v5").timeout_s, reward.route("lcb_v5").think_end) == (6.0, None)


def test_yaml_form_resolves_in_archer_fit_print_config(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from archer.cli import main

    monkeypatch.setattr(sys, "argv", ["archer"])
    override = tmp_path / "routed.yaml"
    override.write_text(yaml.safe_dump({"model": yaml.safe_load(ROUTED_YAML)}))
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quickstart), "--config", str(override), "--print_config",
              f"--model.model_path={tiny_model_dir}"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["reward"]
    assert resolved["class_path"] == "archer.rewards.RoutedReward"
    assert resolved["init_args"]["routes"]["lcb*"]["init_args"]["timeout_s"] == 6.0
