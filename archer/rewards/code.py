"""Reward for generated Python programs: run the row's tests in the sandbox.

Test case formats (``row["tests"]`` is a list of these dicts, or a JSON string of one):

* stdin/stdout: ``{"input": "1 2\\n", "output": "3\\n"}`` — the program reads ``input`` on
  stdin; its stdout must equal ``output`` after :func:`normalize_output` on both sides.
* assert: ``{"assert": "assert add(1, 2) == 3"}`` — the statement is appended to the program
  (HumanEval / MBPP style). It passes iff the program then exits 0 and prints a per-run random
  token the harness writes after the statement (so ``sys.exit(0)`` at the top of a program does
  not pass). The check itself runs inside the sandbox, so an adversarial program can still
  defeat it (e.g. by patching builtins); stdin and call tests are compared outside.
* function call (LiveCodeBench "functional"): ``{"fn_name": "twoSum", "input": "[2, 7]\\n9",
  "output": "[0, 1]"}`` — ``input`` holds one JSON value per line, the positional arguments;
  the harness calls ``Solution().fn_name(*args)`` if the program defines ``class Solution``,
  else the top-level function ``fn_name``, and prints the JSON of the result, which must equal
  ``json.loads(output)`` or one of the optional ``"alt_outputs"`` (JSON strings).

Data sets' own formats (LiveCodeBench, TACO/APPS, compressed private tests) are turned into these
by :func:`archer.rewards.code_tests.normalize_tests`, which :func:`parse_tests` applies.

Each test case is a separate sandboxed run (:func:`archer.rewards.sandbox.run_program`); up to
``num_workers`` run at once.
"""

from __future__ import annotations

import json
import re
import secrets
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from archer.rewards.code_tests import normalize_tests
from archer.rewards.reasoning import DEFAULT_THINK_END, after_thinking
from archer.rewards.sandbox import RunResult, SandboxLimits, isolation_mode, run_program

TestStatus = Literal["ok", "failed", "error", "timeout", "memory", "output_limit", "sandbox_error", "no_tests"]

_FENCED_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_CALL_HARNESS = """

import json as _archer_json, sys as _archer_sys
_archer_args = [_archer_json.loads(_line) for _line in {input!r}.splitlines() if _line.strip()]
_archer_fn = getattr(Solution(), {fn_name!r}) if "Solution" in globals() else globals()[{fn_name!r}]
_archer_sys.stdout.write("\\n" + {token!r} + _archer_json.dumps(_archer_fn(*_archer_args)) + "\\n")
"""


@dataclass(frozen=True)
class TestResult:
    """Outcome of running a program against its test cases."""

    passed: int
    """Number of test cases passed."""
    total: int
    """Number of test cases given."""
    status: TestStatus
    """``ok`` if all passed; else the outcome of the first failing case: ``failed`` (ran, wrong
    answer / assertion), ``error`` (crashed), ``timeout``, ``memory``, ``output_limit``,
    ``sandbox_error``; ``no_tests`` for an empty list."""


def normalize_output(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed to one space, blank lines at both ends dropped.

    ``"3 \\n\\n"``, ``"3\\n"`` and ``" 3"`` all normalise to ``["3"]``; ``"1 2"`` and ``"1\\n2"``
    stay different.
    """
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def extract_code(response: str) -> str:
    """The last fenced ```python (or bare ```) block of ``response``, else the whole response."""
    blocks = _FENCED_BLOCK.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(tests: list[dict] | dict | str) -> list[dict]:
    """``tests`` as a list of test dicts, from any format :func:`normalize_tests` reads. Raises
    ValueError on a bad shape."""
    return normalize_tests(tests)


def _run_one(code: str, test: dict, limits: SandboxLimits) -> tuple[TestStatus, RunResult]:
    token = f"ARCHER-{secrets.token_hex(16)}:"
    if "assert" in test:
        run = run_program(f"{code}\n\n{test['assert']}\nprint({token!r})\n", "", limits)
        if run.status == "ok":
            return ("ok" if token in run.stdout else "failed"), run
        if run.status == "error" and "AssertionError" in run.stderr:
            return "failed", run
        return run.status, run
    if "fn_name" in test:
        run = run_program(code + _CALL_HARNESS.format(input=test["input"], fn_name=test["fn_name"], token=token), "", limits)
        if run.status != "ok":
            return run.status, run
        marker = run.stdout.rfind(token)
        if marker < 0:
            return "failed", run
        try:
            got = json.loads(run.stdout[marker + len(token) :].strip().splitlines()[0])
        except (ValueError, IndexError):  # the program wrote over the harness line
            return "failed", run
        accepted = [json.loads(output) for output in (test["output"], *test.get("alt_outputs", ()))]
        return ("ok" if got in accepted else "failed"), run
    run = run_program(code, test["input"], limits)
    if run.status != "ok":
        return run.status, run
    return ("ok" if normalize_output(run.stdout) == normalize_output(test["output"]) else "failed"), run


def run_tests(
    code: str,
    tests: list[dict],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    num_workers: int = 2,
    stop_at_first_failure: bool = False,
) -> TestResult:
    """Run ``code`` against every test case, each in its own sandbox, ``num_workers`` at a time.

    Args:
        code: the Python program.
        tests: test dicts (formats in the module docstring).
        timeout_s: wall-clock limit per test case.
        memory_mb: address-space limit per process.
        num_workers: test cases run concurrently.
        stop_at_first_failure: skip the cases not yet started once one fails (their count
            stays in ``total``, not in ``passed``) — all-or-nothing scoring needs no more.
    """
    tests = parse_tests(tests)
    if not tests:
        return TestResult(0, 0, "no_tests")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    statuses: list[TestStatus | None] = [None] * len(tests)
    failed = False

    def run_case(index: int) -> None:
        nonlocal failed
        if stop_at_first_failure and failed:
            return
        statuses[index] = _run_one(code, tests[index], limits)[0]
        failed = failed or statuses[index] != "ok"

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        list(pool.map(run_case, range(len(tests))))
    passed = sum(status == "ok" for status in statuses)
    first_failure = next((s for s in statuses if s not in ("ok", None)), "ok")
    return TestResult(passed, len(tests), first_failure)


class CodeReward:
    """Runs the row's tests against the code in the response (after the reasoning block).

    Args:
        mode: ``"all"``: 1.0 iff every test passes; ``"fraction"``: passed / total.
        timeout_s: wall-clock limit per test case (a whole call can take
            ``ceil(len(tests) / num_workers) * timeout_s``; give RewardRunner more).
        memory_mb: address-space limit per process, MiB.
        num_workers: test cases of one response run concurrently.
        think_end: end-of-thinking marker: code is taken only from the text after its last
            occurrence (the whole response when it is absent); None: always the whole response.
        tests_key: row key holding the tests, in any format :func:`parse_tests` reads (``answer``
            for a verl-style file whose ``reward_model.ground_truth`` holds the tests of its code rows).
    """

    def __init__(
        self,
        mode: Literal["all", "fraction"] = "all",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        num_workers: int = 2,
        think_end: str | None = DEFAULT_THINK_END,
        tests_key: str = "tests",
    ) -> None:
        if mode not in ("all", "fraction"):
            raise ValueError(f"CodeReward mode must be 'all' or 'fraction', got {mode!r}")
        self.mode = mode
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.num_workers = num_workers
        self.think_end = think_end
        self.tests_key = tests_key
        if isolation_mode() == "none":
            warnings.warn(
                "archer.rewards: neither root nor unprivileged user namespaces are available; generated code runs "
                "WITHOUT network or filesystem isolation (rlimits only). See docs/rewards.md.",
                stacklevel=2,
            )

    def __call__(self, response: str, row: dict) -> float:
        if self.tests_key not in row:
            raise KeyError(f"CodeReward needs row[{self.tests_key!r}]; the row has keys {sorted(row)}")
        result = run_tests(
            extract_code(after_thinking(response, self.think_end)),
            row[self.tests_key],
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            num_workers=self.num_workers,
            stop_at_first_failure=self.mode == "all",
        )
        if result.total == 0:
            return 0.0
        if self.mode == "all":
            return float(result.passed == result.total)
        return result.passed / result.total
