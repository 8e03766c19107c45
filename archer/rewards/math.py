"""Reward for math answers: extract the final answer, check equivalence with math-verify.

Extraction, in order, from the last ``max_chars`` characters of the response only (a
megabyte response costs no more than a short one):

1. the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces);
2. with ``fallback=True``: the text after the last "answer is" / "Answer:" up to the end of
   its sentence or line;
3. with ``fallback=True``: the last number (``-1,234.5``, ``3/4``, ``50%``).

The extracted answer and the ground truth are then compared by math-verify (LaTeX and plain
expressions, fractions = decimals, radicals, sets, intervals, tuples, percentages, symbolic
equality), except that single multiple-choice letters (``B``, ``(B)``, ``\\text{B}``) are compared
as letters, and ``1,000``-style thousands separators are removed first. One exception to that:
math-verify reads some answers of several labelled parts as one of them (``λ = 2\\sqrt{2}, A(\\pm 1,
0)``, from the CNMO set, as the number 0, so that ``\\boxed{0}`` scored 1). When the reference has
several comma-separated parts outside brackets, math-verify reads it as a single value (not a set,
tuple or interval), and a part holds letters (labels, points), the answer is graded part by part
instead: as many parts, each equal to a distinct part of the reference — as text, or ``label = value``
with the same label and an equal value, or as numbers. Answers longer than
``max_answer_chars`` or nesting braces deeper than ``max_brace_depth`` score 0 without being
parsed, and ``timeout_s`` bounds the rest (in the main thread; elsewhere run it under
:class:`archer.rewards.RewardRunner`).

:class:`MathReward` first keeps only the text after the end-of-thinking marker
(:func:`archer.rewards.reasoning.after_thinking`), and gives :meth:`MathReward.extract_answer`,
the normalised answer string ``archer eval`` votes on for maj@k.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from archer.rewards.reasoning import DEFAULT_THINK_END, after_thinking

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_PHRASE = re.compile(r"(?:answer is|answer:)\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?%?")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE = re.compile(r"^\(?([A-J])\)?$")
_CHOICE_WRAPPERS = re.compile(r"\\text(?:bf)?\{([^{}]*)\}|\$")
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


class _MathTimeout(BaseException):
    """Raised by the interval timer; a BaseException so math-verify's ``except Exception`` lets it through."""


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` or ``\\fbox{…}`` in ``text``; None if there is none or it is unclosed."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for position in range(open_brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : position]
    return None


def fallback_answer(text: str) -> str | None:
    """The last "answer is X" phrase's X, else the last number in ``text``, else None."""
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return phrases[-1].strip().strip("$").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _brace_depth(text: str) -> int:
    """Deepest ``{`` nesting in ``text``."""
    depth = deepest = 0
    for character in text:
        if character == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif character == "}":
            depth -= 1
    return deepest


def extract_answer(response: str, *, fallback: bool = True, max_chars: int = 4096) -> str | None:
    """The final answer of ``response`` (steps 1-3 of the module docstring, last ``max_chars``
    characters only), or None when there is none."""
    tail = response[-max_chars:]
    answer = last_boxed(tail)
    if answer is None and fallback:
        answer = fallback_answer(tail)
    return answer


def _normalize(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return answer


def _choice_letter(answer: str) -> str | None:
    """``B`` for ``B``, ``(B)``, ``\\text{B}``, ``$B$``; None for anything else."""
    match = _CHOICE.match(_CHOICE_WRAPPERS.sub(lambda m: m.group(1) or "", answer).strip())
    return match.group(1) if match else None


_OPENERS, _CLOSERS = "([{", ")]}"
_SET_BRACES = re.compile(r"^(?:\\left)?\\\{(.*?)(?:\\right)?\\\}$|^\{(.*)\}$", re.S)


def top_level_parts(answer: str) -> list[str]:
    """``answer`` split at the commas outside any bracket, after removing set braces around the whole
    (``\\{1, 2\\}`` → ``["1", "2"]``; ``(1, 2)`` stays one part, a tuple; ``[0, 1)`` one, an interval)."""
    answer = answer.strip()
    braces = _SET_BRACES.match(answer)
    if braces:
        answer = (braces.group(1) if braces.group(1) is not None else braces.group(2)).strip()
    parts, depth, start = [], 0, 0
    for position, character in enumerate(answer):
        if character in _OPENERS:
            depth += 1
        elif character in _CLOSERS:
            depth -= 1
        elif character == "," and depth == 0:
            parts.append(answer[start:position].strip())
            start = position + 1
    parts.append(answer[start:].strip())
    return parts


def _parts_match(gold: list[str], predicted: list[str]) -> bool:
    """Each gold part equals a distinct predicted part (:func:`_same_part`), in any order."""
    if len(gold) != len(predicted):
        return False
    left = list(predicted)
    for part in gold:
        match = next((i for i, other in enumerate(left) if _same_part(part, other)), None)
        if match is None:
            return False
        left.pop(match)
    return True


_COMMANDS = re.compile(r"\\text\{[^{}]*\}|\\[a-zA-Z]+")


def _has_letters(part: str) -> bool:
    """Letters outside LaTeX commands and ``\\text{}`` units: a label or a symbolic part."""
    return re.search(r"[a-zA-Z]", _COMMANDS.sub("", part)) is not None


def _same_part(a: str, b: str) -> bool:
    """Equal as text (spaces aside); or ``label = value`` with the same label and equal values; or,
    when neither holds letters, equal by math-verify. A part with letters is never compared by
    math-verify alone (it may read ``A(\\pm 1, 0)`` as 0)."""
    a, b = a.replace(" ", ""), b.replace(" ", "")
    if a == b:
        return True
    if a.count("=") == 1 and b.count("=") == 1:
        (label_a, a), (label_b, b) = a.split("="), b.split("=")
        if label_a != label_b:
            return False
    if _has_letters(a) or _has_letters(b):
        return a == b
    return _verified(a, b)


def _verified(a: str, b: str) -> bool:
    return bool(verify(parse(f"${a}$", _EXTRACTION, parsing_timeout=None),
                       parse(f"${b}$", _EXTRACTION, parsing_timeout=None), timeout_seconds=None))


def _read_as_one_value(parsed: list) -> bool:
    """math-verify's reading is a single value: not a set, tuple, interval, union or list of them."""
    import sympy

    collections = (sympy.FiniteSet, sympy.Tuple, sympy.Interval, sympy.Union, sympy.Set, list, tuple, set)
    return bool(parsed) and not isinstance(parsed[0], collections)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _MathTimeout after ``seconds`` (main thread only: elsewhere signals cannot be used,
    and the caller's RewardRunner is the limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _MathTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score(
    response: str,
    ground_truth: str,
    *,
    timeout_s: float = 5.0,
    fallback: bool = True,
    max_chars: int = 4096,
    max_answer_chars: int = 512,
    max_brace_depth: int = 8,
) -> float:
    """1.0 if the response's final answer is mathematically equal to ``ground_truth``, else 0.0.

    Args:
        response: the model's full response.
        ground_truth: the reference answer (LaTeX or plain, with or without ``$``).
        timeout_s: time limit for parsing + verification; past it the score is 0.
        fallback: use "the answer is X" and the last number when there is no ``\\boxed{}``.
        max_chars: only the last ``max_chars`` characters of the response are searched.
        max_answer_chars: an extracted answer longer than this scores 0 unparsed.
        max_brace_depth: an answer nesting ``{`` deeper than this scores 0 unparsed (sympy can
            take seconds on deep nests; real answers rarely go past 4).
    """
    answer = extract_answer(response, fallback=fallback, max_chars=max_chars)
    if answer is None or len(answer) > max_answer_chars or _brace_depth(answer) > max_brace_depth:
        return 0.0
    gold, predicted = _normalize(str(ground_truth)), _normalize(answer)
    gold_letter = _choice_letter(gold)
    if gold_letter is not None:
        return float(gold_letter == _choice_letter(predicted))
    try:
        with _time_limit(timeout_s):
            gold_parsed = parse(f"${gold}$", _EXTRACTION, parsing_timeout=None)
            gold_parts = top_level_parts(gold)
            if len(gold_parts) > 1 and _read_as_one_value(gold_parsed) and any(map(_has_letters, gold_parts)):
                return float(_parts_match(gold_parts, top_level_parts(predicted)))
            predicted_parsed = parse(f"${predicted}$", _EXTRACTION, parsing_timeout=None)
            return float(verify(gold_parsed, predicted_parsed, timeout_seconds=None))
    except _MathTimeout:
        return 0.0


class MathReward:
    """:func:`score` of the response (after the reasoning block) against ``row["answer"]``.

    Args:
        timeout_s: time limit per call (parsing + verification).
        fallback: accept "the answer is X" / the last number when there is no ``\\boxed{}``.
        max_chars: only the tail of this many characters of a response is searched.
        think_end: end-of-thinking marker: only the text after its last occurrence is graded
            (the whole response when it is absent); None grades the whole response always.
    """

    def __init__(
        self, timeout_s: float = 5.0, fallback: bool = True, max_chars: int = 4096, think_end: str | None = DEFAULT_THINK_END
    ) -> None:
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.max_chars = max_chars
        self.think_end = think_end

    def __call__(self, response: str, row: dict) -> float:
        if "answer" not in row:
            raise KeyError(f"MathReward needs row['answer']; the row has keys {sorted(row)}")
        return score(
            after_thinking(response, self.think_end), row["answer"],
            timeout_s=self.timeout_s, fallback=self.fallback, max_chars=self.max_chars,
        )

    def extract_answer(self, response: str, row: dict) -> str | None:
        """The answer this reward would grade, normalised (``$`` and thousands separators
        removed), for majority voting; None when the response has none."""
        answer = extract_answer(after_thinking(response, self.think_end), fallback=self.fallback, max_chars=self.max_chars)
        return None if answer is None else _normalize(answer)
