"""Reward for code completions (HumanEval): the program is the prompt followed by the response.

A completion prompt is the start of a program (HumanEval's: imports, the signature and docstring
of the function) that the model continues. The program run against the row's tests is
``row["prompt"] + completion``, where ``completion`` is the response cut at the first of
``stop_sequences`` — by default HumanEval's (Chen et al., 2021): a new top-level ``def``,
``class``, ``if``, ``print`` or comment line ends the function body, so what a model writes after
the function (more examples, a ``__main__`` block) is not run. Tests are run as
:class:`~archer.rewards.CodeReward` runs them (each in its own sandboxed process; HumanEval's one
test is an assert test calling ``check(entry_point)``).
"""

from __future__ import annotations

from typing import Literal

from archer.rewards.code import CodeReward, run_tests

__all__ = ["HUMANEVAL_STOP", "CompletionCodeReward", "truncate_at_stop"]

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The stop sequences of the HumanEval paper: a line starting a new top-level statement."""


def truncate_at_stop(completion: str, stop_sequences: tuple[str, ...]) -> str:
    """``completion`` up to (without) the earliest of ``stop_sequences``; whole when none occurs."""
    cut = min((i for i in (completion.find(stop) for stop in stop_sequences) if i >= 0), default=len(completion))
    return completion[:cut]


class CompletionCodeReward(CodeReward):
    """Runs ``row[prompt_key] + response`` (cut at ``stop_sequences``) against the row's tests.

    Args:
        stop_sequences: the response ends at the first of these (HumanEval's by default); ``()``
            keeps it whole.
        prompt_key: row key holding the completion prompt the response continues.
        mode, timeout_s, memory_mb, num_workers, tests_key: as for :class:`~archer.rewards.CodeReward`.
    """

    def __init__(
        self,
        stop_sequences: tuple[str, ...] = HUMANEVAL_STOP,
        prompt_key: str = "prompt",
        mode: Literal["all", "fraction"] = "all",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        num_workers: int = 2,
        tests_key: str = "tests",
    ) -> None:
        # A completion has no reasoning block to skip: the response is code from its first character.
        super().__init__(mode=mode, timeout_s=timeout_s, memory_mb=memory_mb, num_workers=num_workers,
                         think_end=None, tests_key=tests_key)
        self.stop_sequences = tuple(stop_sequences)
        self.prompt_key = prompt_key

    def __call__(self, response: str, row: dict) -> float:
        for key in (self.prompt_key, self.tests_key):
            if key not in row:
                raise KeyError(f"CompletionCodeReward needs row[{key!r}]; the row has keys {sorted(row)}")
        if not isinstance(row[self.prompt_key], str):
            raise TypeError(f"CompletionCodeReward: row[{self.prompt_key!r}] is {type(row[self.prompt_key]).__name__}, "
                            "expected the completion prompt as a string")
        program = row[self.prompt_key] + truncate_at_stop(response, self.stop_sequences)
        result = run_tests(program, row[self.tests_key], timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                           num_workers=self.num_workers, stop_at_first_failure=self.mode == "all")
        if result.total == 0:
            return 0.0
        return float(result.passed == result.total) if self.mode == "all" else result.passed / result.total
