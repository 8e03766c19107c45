"""run_tests / CodeReward: honest solutions pass in every test format, broken and hostile ones score 0."""

import json

import pytest

from archer.rewards import CodeReward, run_tests
from archer.rewards.code import extract_code, normalize_output, parse_tests

ADD_STDIN = "a, b = map(int, input().split())\nprint(a + b)\n"
STDIN_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}, {"input": "0 0\n", "output": " 0 \n\n"}]


def test_stdin_tests_pass_for_an_honest_solution():
    result = run_tests(ADD_STDIN, STDIN_TESTS, timeout_s=3.0)
    assert (result.passed, result.total, result.status) == (3, 3, "ok")


def test_wrong_answer_counts_per_test():
    # a - b: right only when b == 0 ("0 0" -> 0)
    result = run_tests(ADD_STDIN.replace("a + b", "a - b"), STDIN_TESTS, timeout_s=3.0)
    assert (result.passed, result.total, result.status) == (1, 3, "failed")


def test_assert_and_call_styles():
    code = "def add(a, b):\n    return a + b\n"
    asserts = [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(-1, 1) == 0"}, {"assert": "assert add(2, 2) == 5"}]
    assert run_tests(code, asserts, timeout_s=3.0).passed == 2
    calls = [{"fn_name": "add", "input": "[1, 2]\n[3]", "output": "[1, 2, 3]"}, {"fn_name": "add", "input": "1\n2", "output": "4"}]
    assert run_tests(code, calls, timeout_s=3.0).passed == 1
    solution_class = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n"
    assert run_tests(solution_class, [{"fn_name": "twoSum", "input": "[2, 7]\n9", "output": "[0, 1]"}]).passed == 1


def test_exiting_early_does_not_pass_an_assert():
    result = run_tests("import sys\nsys.exit(0)\n", [{"assert": "assert False"}], timeout_s=3.0)
    assert (result.passed, result.status) == (0, "failed")


def test_code_reward_modes_and_extraction():
    response = "First try:\n```python\nprint(0)\n```\nFixed:\n```python\n" + ADD_STDIN + "```\n"
    row = {"tests": json.dumps(STDIN_TESTS)}
    assert CodeReward(mode="all", timeout_s=3.0)(response, row) == 1.0
    half_right = "```python\n" + ADD_STDIN.replace("a + b", "a - b") + "```"
    assert CodeReward(mode="all", timeout_s=3.0)(half_right, row) == 0.0
    assert CodeReward(mode="fraction", timeout_s=3.0)(half_right, row) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("while True:\n    pass", "timeout"),
        ("x = bytearray(8 << 30)", "memory"),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "output_limit"),
        ("raise SystemExit(3)", "error"),
    ],
)
def test_hostile_programs_score_zero(program, status, no_leftovers):
    # 1 s would do on an idle machine; 3 s leaves margin when other jobs load the CPU.
    result = run_tests(program, [{"input": "", "output": "3"}], timeout_s=1.0 if status == "timeout" else 3.0)
    assert (result.passed, result.status) == (0, status)


def test_helpers():
    assert normalize_output("1  2 \n\n") == ["1 2"]
    assert normalize_output("1\n2") != normalize_output("1 2")
    assert extract_code("no fences here") == "no fences here"
    with pytest.raises(ValueError, match=r"tests\[1\]"):
        parse_tests([{"input": "", "output": ""}, {"stdin": "x"}])
    assert run_tests("print(1)", []).status == "no_tests"
