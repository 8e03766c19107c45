"""Synthetic tasks with verifiable answers: deterministic row generators that are also rewards.

A task makes rows ``{"prompt": str, "answer": str, "data_source": str, ...}`` from a seed and scores a
response against a row. Because ``task(response, row) == task.score(response, row)``, the task
object doubles as the reward function for its own rows. Rows depend only on ``(num, seed)``, so
train/val splits are reproducible; use different seeds for train and val.

Scoring reads only the start of a response. Two rules are used, both written out in each task:

* **first character** — the first non-whitespace character of the response must equal the
  one-character answer (``DigitCopyTask``, ``DigitSumTask``).
* **first word** — the response's first whitespace-separated word must equal the answer
  (``AdditionTask``, ``ReverseTask``); ``CountdownTask`` evaluates its first word instead.

Reading only the start lets a model be scored with a small ``max_new_tokens`` and ignores
whatever it writes after its answer.

:class:`ReasoningGymTask` draws its rows from reasoning-gym's generators instead (100+ families,
an optional package) and scores them with each family's own scorer
(:class:`archer.rewards.ReasoningGymReward`).
"""

from __future__ import annotations

import ast
import random
import string
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

from archer.rewards.reasoning import DEFAULT_THINK_END
from archer.rewards.reasoning_gym import (
    INSTALL_REASONING_GYM,
    REASONING_GYM_KEY,
    ReasoningGymReward,
    reasoning_gym_dataset,
)
from archer.seeding import derive_seed

__all__ = [
    "SyntheticTask",
    "DigitCopyTask",
    "DigitSumTask",
    "AdditionTask",
    "ReverseTask",
    "CountdownTask",
    "ReasoningGymTask",
    "first_char",
    "first_word",
]


def first_char(response: str) -> str:
    """The first non-whitespace character of ``response`` ('' when there is none)."""
    return response.lstrip()[:1]


def first_word(response: str) -> str:
    """The first whitespace-separated word of ``response`` ('' when there is none)."""
    words = response.split(maxsplit=1)
    return words[0] if words else ""


class SyntheticTask(ABC):
    """A generator of verifiable rows that scores responses to them (and is thus a reward)."""

    data_source: str = "synthetic"
    """Name stored in each row's ``data_source`` (used to report metrics per source)."""

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """One row ``{"prompt", "answer", ...}`` drawn with ``rng``; ``data_source`` is added by ``rows``.
        The tasks here implement it; a task that generates its rows another way overrides ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither make_row nor rows")

    @abstractmethod
    def score(self, response: str, row: dict[str, Any]) -> float:
        """Reward in [0, 1] of ``response`` (decoded text, special tokens stripped) for ``row``."""

    def rows(self, num: int, seed: int) -> list[dict[str, Any]]:
        """``num`` rows, identical for identical ``(num, seed)``; a longer list extends a shorter one."""
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        rng = random.Random(seed)
        return [{**self.make_row(rng), "data_source": self.data_source} for _ in range(num)]

    def __call__(self, response: str, row: dict[str, Any]) -> float:
        return self.score(response, row)


class DigitCopyTask(SyntheticTask):
    """Copy one digit: prompt ``"copy 7"``, answer ``"7"``.

    Score: 1.0 if the first non-whitespace character of the response is the digit, else 0.0.
    This is the task a randomly initialised tiny model learns with GRPO on CPU: the reward
    depends on one sampled token, and the digit sits at a fixed distance from the end of the
    chat-rendered prompt, so one attention pattern solves every row. A random model scores about
    0.01-0.03 (it rarely starts with the right one of ~100 characters); measured with plain GRPO
    (group-mean baseline, 16 prompts x n=8, max_new_tokens=4, temperature 1, Adam lr 5e-4, the
    ``archer.tiny`` default model) the mean reward rose from 0.02 over the first 30 steps to
    0.58-0.90 over the last 30 of 300 steps; at lr 2e-3 the policy collapsed onto one digit
    (reward ~0.1) and stayed there.
    """

    data_source = "digit_copy"

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        digit = str(rng.randrange(10))
        return {"prompt": f"copy {digit}", "answer": digit}

    def score(self, response: str, row: dict[str, Any]) -> float:
        return float(first_char(response) == row["answer"])


class DigitSumTask(SyntheticTask):
    """Last digit of a sum of two digits: prompt ``"7+8="``, answer ``"5"`` (= (7 + 8) mod 10).

    Score: 1.0 if the first non-whitespace character of the response is the answer digit, else 0.0.
    Harder than ``DigitCopyTask``: the answer depends on both operands (a 10 × 10 table).
    """

    data_source = "digit_sum"

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)}

    def score(self, response: str, row: dict[str, Any]) -> float:
        return float(first_char(response) == row["answer"])


class AdditionTask(SyntheticTask):
    """Add two ``num_digits``-digit numbers: prompt ``"123+456="``, answer ``"579"``.

    Score: 1.0 if the first whitespace-separated word of the response equals the sum, else 0.0.
    """

    data_source = "addition"

    def __init__(self, num_digits: int = 2) -> None:
        """
        Args:
            num_digits: Digits of each operand (leading digit nonzero when num_digits > 1).
        """
        if num_digits < 1:
            raise ValueError(f"num_digits must be >= 1, got {num_digits}")
        self.num_digits = num_digits

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        low = 10 ** (self.num_digits - 1) if self.num_digits > 1 else 0
        high = 10**self.num_digits
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}

    def score(self, response: str, row: dict[str, Any]) -> float:
        return float(first_word(response) == row["answer"])


class ReverseTask(SyntheticTask):
    """Reverse a lowercase string: prompt ``"reverse abc"``, answer ``"cba"``.

    Score: 1.0 if the first whitespace-separated word of the response is the reversed string, else 0.0.
    """

    data_source = "reverse"

    def __init__(self, min_length: int = 3, max_length: int = 6) -> None:
        """
        Args:
            min_length: Shortest string to reverse.
            max_length: Longest string to reverse.
        """
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        self.min_length = min_length
        self.max_length = max_length

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        length = rng.randint(self.min_length, self.max_length)
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        return {"prompt": f"reverse {text}", "answer": text[::-1]}

    def score(self, response: str, row: dict[str, Any]) -> float:
        return float(first_word(response) == row["answer"])


# Only these AST nodes may appear in a Countdown expression: integers, + - *, and parentheses
# (which the parser folds away). Anything else (names, calls, **, /) scores 0 without evaluation.
_COUNTDOWN_OPERATORS = (ast.Add, ast.Sub, ast.Mult)


def _countdown_value(node: ast.AST, leaves: list[int]) -> int:
    """Evaluate a ``+ - *`` integer expression tree, appending its integer literals to ``leaves``."""
    if isinstance(node, ast.Expression):
        return _countdown_value(node.body, leaves)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, _COUNTDOWN_OPERATORS):
        left, right = _countdown_value(node.left, leaves), _countdown_value(node.right, leaves)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        return left * right
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)}")


class CountdownTask(SyntheticTask):
    """Countdown-lite: reach a target with ``+ - *`` using each given number exactly once.

    Prompt ``"use 3 5 2 make 13"``; the row stores ``numbers`` and ``target`` and, as ``answer``,
    one reference expression (e.g. ``"3*5-2"``); any other correct expression scores as well.
    Score: 1.0 if the response's first whitespace-separated word is an expression of integer
    literals, ``+ - *`` and parentheses that uses exactly the multiset ``numbers`` and evaluates
    to ``target``; else 0.0.
    """

    data_source = "countdown"

    def __init__(self, num_numbers: int = 3, max_number: int = 9) -> None:
        """
        Args:
            num_numbers: How many numbers each puzzle gives.
            max_number: Numbers are drawn uniformly from 1..max_number.
        """
        if num_numbers < 2 or max_number < 1:
            raise ValueError(f"need num_numbers >= 2 and max_number >= 1, got {num_numbers}, {max_number}")
        self.num_numbers = num_numbers
        self.max_number = max_number

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
        # A left-to-right chain of random operators over the numbers is solvable by construction.
        expression = str(numbers[0])
        for number in numbers[1:]:
            expression += rng.choice("+-*") + str(number)
        target = eval(expression)  # noqa: S307 -- built above from digits and + - * only
        shown = sorted(numbers)
        return {
            "prompt": f"use {' '.join(map(str, shown))} make {target}",
            "answer": expression,
            "numbers": shown,
            "target": target,
        }

    def score(self, response: str, row: dict[str, Any]) -> float:
        expression = first_word(response)
        # Long inputs could hide huge powers of ten; a real answer is a few characters long.
        if not expression or len(expression) > 64:
            return 0.0
        leaves: list[int] = []
        try:
            value = _countdown_value(ast.parse(expression, mode="eval"), leaves)
        except (SyntaxError, ValueError, RecursionError):
            return 0.0
        return float(value == row["target"] and Counter(leaves) == Counter(row["numbers"]))


class ReasoningGymTask(SyntheticTask):
    """Rows of reasoning-gym task families, mixed by weight, scored by each family's own scorer.

    ``datasets`` lists the families: a name (``"chain_sum"``), or ``{"name", "weight" (default 1),
    "config" (default {}: the family's defaults)}`` where ``config`` holds the keyword arguments of
    the family's config class (``reasoning_gym.create_dataset(name, **config)``; ``seed`` and
    ``size`` are set here). Row ``i`` of ``rows(num, seed)`` belongs to a family drawn with the
    weights from ``random.Random(seed)``, and is item ``i`` of that family's data set generated with
    ``size=num`` and a seed derived from ``(seed, family)``; so rows depend only on ``(num, seed)``
    and, for every family whose items do not depend on ``size`` (all but ``acre``), a longer list
    extends a shorter one. A row is ``{"prompt": question, "answer", "metadata", "reasoning_gym":
    {"dataset", "config", "seed"}, "data_source": "reasoning_gym"}``: what the scorer needs, which
    rebuilds the family's data set from it (:class:`archer.rewards.ReasoningGymReward`). The family
    is ``row["reasoning_gym"]["dataset"]``.

    In YAML::

        data:
          task:
            class_path: archer.data.tasks.ReasoningGymTask
            init_args:
              datasets:
                - {name: chain_sum, weight: 2, config: {min_terms: 2, max_terms: 2, max_digits: 1}}
                - gcd
              answer_tag: null      # the whole response is the answer (a model prompted to answer directly)

    Needs the package: ``pip install reasoning-gym`` (or ``bash install.sh evals``).
    """

    data_source = "reasoning_gym"

    def __init__(
        self,
        datasets: list[str | dict[str, Any]],
        answer_tag: str | None = "answer",
        think_end: str | None = DEFAULT_THINK_END,
    ) -> None:
        """
        Args:
            datasets: The families: names, or ``{"name", "weight", "config"}`` dicts (see the class docstring).
            answer_tag: The answer is the content of the last ``<answer_tag>...</answer_tag>`` of a response
                (reasoning-gym's convention; put its instruction in ``data.system_prompt``); None: the whole
                response, stripped.
            think_end: End-of-thinking marker: only the text after it is read (None: the whole response).
        """
        try:
            from reasoning_gym.factory import DATASETS
        except ImportError as error:
            raise ImportError(f"ReasoningGymTask needs reasoning-gym: {INSTALL_REASONING_GYM}") from error
        if not datasets:
            raise ValueError("ReasoningGymTask needs at least one data set")
        self.datasets: list[dict[str, Any]] = []
        for entry in datasets:
            spec = {"name": entry} if isinstance(entry, str) else dict(entry)
            unknown = set(spec) - {"name", "weight", "config"}
            if unknown or "name" not in spec:
                raise ValueError(f"ReasoningGymTask data set {entry!r}: expected a name or {{name, weight, config}}")
            name, weight, config = spec["name"], float(spec.get("weight", 1.0)), dict(spec.get("config") or {})
            if name not in DATASETS:
                raise ValueError(f"ReasoningGymTask: no reasoning-gym data set {name!r}; "
                                 f"there are {len(DATASETS)}, e.g. {', '.join(sorted(DATASETS)[:8])}, ...")
            if weight <= 0:
                raise ValueError(f"ReasoningGymTask data set {name!r}: weight must be > 0, got {weight}")
            if {"seed", "size"} & config.keys():
                raise ValueError(f"ReasoningGymTask data set {name!r}: config sets seed/size, which come from "
                                 "data.seed and data.train_size / val_size")
            try:
                checked = DATASETS[name][1](**config)
                if hasattr(checked, "validate"):
                    checked.validate()
            except (TypeError, AssertionError, ValueError) as error:
                raise ValueError(f"ReasoningGymTask data set {name!r}: bad config {config}: {error}") from error
            self.datasets.append({"name": name, "weight": weight, "config": config})
        names = [d["name"] for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"ReasoningGymTask: a data set is listed twice: {names}")
        self.reward = ReasoningGymReward(answer_tag=answer_tag, think_end=think_end)

    def rows(self, num: int, seed: int) -> list[dict[str, Any]]:
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        rng = random.Random(seed)
        seeds = {d["name"]: derive_seed("reasoning-gym", seed, d["name"]) for d in self.datasets}
        generators = {
            d["name"]: reasoning_gym_dataset(d["name"], {**d["config"], "size": max(num, 1)}, seeds[d["name"]])
            for d in self.datasets
        }
        families = rng.choices(self.datasets, weights=[d["weight"] for d in self.datasets], k=num)
        rows = []
        for index, family in enumerate(families):
            name = family["name"]
            entry = generators[name][index]
            rows.append({
                "prompt": entry["question"],
                "answer": entry["answer"],
                "metadata": entry["metadata"],
                REASONING_GYM_KEY: {"dataset": name, "config": family["config"], "seed": seeds[name]},
                "data_source": self.data_source,
            })
        return rows

    def score(self, response: str, row: dict[str, Any]) -> float:
        return self.reward(response, row)
