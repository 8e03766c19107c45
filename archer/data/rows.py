"""Read prompt rows from local data files and validate them.

A row becomes ``{"prompt": str | list[message], "answer": str (when present), "tests": list
(code rows), "data_source": str, **other fields}`` whatever the field names in the file are.
Field names are dotted paths into nested records: verl-style rows use
``answer: reward_model.ground_truth`` (the default ``answer`` falls back to it, see
:func:`answer_field`), and a path may step into a JSON-object string
(LiveCodeBench's ``metadata.func_name``, where ``metadata`` is a JSON string). ``tests`` may name
several fields, whose test lists are concatenated (LiveCodeBench's
``public_test_cases,private_test_cases``); tests in any format of
:func:`archer.rewards.code_tests.normalize_tests` (LiveCodeBench, TACO/APPS, compressed) become
Archer's test dicts. A row needs an answer, or tests, or both. A row with ``raw_prompt: true``
holds a completion prompt (HumanEval's): it is tokenized as it is, without chat template, system
prompt or prompt template (:func:`archer.data.render_row`).

``builtin:NAME`` instead of a file reads a built-in benchmark (:mod:`archer.data.benchmarks`),
whose rows are already in this form: the field names are not looked up in them.

A bad row (broken JSON, a missing field, a wrong type, an empty prompt, unreadable tests) raises
``BadRowError`` naming ``file:line:field``, or — with ``skip_bad_rows=True`` — is skipped and
counted. Records are numbered from 1 as :mod:`archer.data.formats` describes (the JSONL line, the
JSON array element, the Parquet/Arrow row).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archer.data.benchmarks import RAW_PROMPT_KEY, benchmark_rows, is_builtin
from archer.data.formats import iter_records
from archer.rewards.code_tests import normalize_tests

__all__ = ["BadRowError", "RowFields", "ReadResult", "answer_field", "read_rows", "validate_row", "lookup"]

log = logging.getLogger(__name__)

VERL_ANSWER = "reward_model.ground_truth"
"""Where verl-style rows (chat ``prompt``, ``reward_model``, ``data_source``) keep the reference answer."""


class BadRowError(ValueError):
    """A row that cannot be used; ``str()`` starts with ``file:line:field``."""

    def __init__(self, file: str, line: int, field: str, reason: str) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(f"{file}:{line}:{field}: {reason}")


@dataclass(frozen=True)
class RowFields:
    """Which fields (dotted paths) of a source row hold the prompt, answer, tests and source name."""

    prompt: str = "prompt"
    """Field with the prompt: a non-empty string or a non-empty list of ``{"role", "content"}`` messages."""
    answer: str = "answer"
    """Field with the reference answer (a string; an integer is turned into its decimal string);
    may be absent in rows that have tests. With this default, a row without one is read from verl's
    ``reward_model.ground_truth`` when it has that (:func:`answer_field`)."""
    tests: str | tuple[str, ...] = "tests"
    """Field(s) with test cases for code tasks, concatenated in order; absent or null means none.
    A comma-separated string names several."""
    data_source: str = "data_source"
    """Field naming the row's source (what a ``RoutedReward`` routes on); default: the file's stem."""
    fn_name: str = "metadata.func_name"
    """Field naming the function LiveCodeBench functional tests call when the tests name none."""

    @property
    def tests_paths(self) -> tuple[str, ...]:
        """The tests field(s) as a tuple of paths."""
        if isinstance(self.tests, str):
            return tuple(path.strip() for path in self.tests.split(",") if path.strip())
        return tuple(self.tests)


@dataclass
class ReadResult:
    """Rows read from one file."""

    rows: list[dict[str, Any]]
    """Validated rows in file order."""
    num_skipped: int
    """Bad rows skipped (only nonzero with ``skip_bad_rows=True``)."""


def lookup(record: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``record``; None when it is absent.

    A key holding a literal dot is found as is; otherwise each step enters a dict, or a string
    holding a JSON object.
    """
    if isinstance(record, dict) and path in record:
        return record[path]
    value = record
    for key in path.split("."):
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def answer_field(record: Any, fields: RowFields) -> str:
    """The field a record's answer is read from: ``fields.answer``, except that with the default
    ``answer`` a record without one that has verl's ``reward_model.ground_truth`` is read from that
    (unless ``reward_model.ground_truth`` is read as tests), so a verl-style file needs no ``answer_key``.
    """
    if (
        fields.answer == RowFields.answer
        and VERL_ANSWER not in fields.tests_paths
        and lookup(record, fields.answer) is None
        and lookup(record, VERL_ANSWER) is not None
    ):
        return VERL_ANSWER
    return fields.answer


def _validate_prompt(prompt: Any, where: tuple[str, int, str]) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRowError(*where, "empty prompt")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise BadRowError(*where, "empty list of messages")
        for i, message in enumerate(prompt):
            if not isinstance(message, dict):
                raise BadRowError(*where, f"message {i} is {type(message).__name__}, expected a dict")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise BadRowError(*where, f"message {i} needs a string {key!r}")
        if not any(message["content"].strip() for message in prompt):
            raise BadRowError(*where, "every message is empty")
        return [{"role": message["role"], "content": message["content"]} for message in prompt]
    raise BadRowError(*where, f"is {type(prompt).__name__}, expected a string or a list of messages")


def _tests(record: dict, fields: RowFields, file: str, line: int) -> list[dict] | None:
    """The row's tests as Archer test dicts, concatenated over the tests fields; None if it has none."""
    fn_name = lookup(record, fields.fn_name)
    tests, found = [], False
    for path in fields.tests_paths:
        value = lookup(record, path)
        if value is None:
            continue
        if not isinstance(value, (list, dict, str)):
            raise BadRowError(file, line, path, f"is {type(value).__name__}, expected a list, dict or string")
        try:
            tests.extend(normalize_tests(value, fn_name=fn_name if isinstance(fn_name, str) else None))
        except Exception as error:  # noqa: BLE001
            # Any failure, not only the ValueErrors normalize_tests raises on purpose: the restricted
            # unpickler of compressed tests can raise almost anything on crafted or corrupt bytes
            # (TypeError for an unhashable dict key, KeyError for a missing memo entry, struct.error,
            # MemoryError, RecursionError ...), and a malformed test dict a KeyError or TypeError.
            # The user gets the row and field to look at, the cause chained.
            reason = str(error) if isinstance(error, ValueError) else f"unreadable tests ({type(error).__name__}: {error})"
            raise BadRowError(file, line, path, reason) from error
        found = True
    return tests if found else None


def validate_row(record: Any, fields: RowFields, file: str, line: int) -> dict[str, Any]:
    """Turn one source record into a row with canonical keys, or raise ``BadRowError``.

    The canonical ``prompt``/``answer``/``tests``/``data_source`` keys replace the top-level
    source fields they were read from; the other fields are kept; ``data_source`` defaults to the
    file's stem; the answer is read from :func:`answer_field`.
    """
    if not isinstance(record, dict):
        raise BadRowError(file, line, "<row>", f"is {type(record).__name__}, expected a JSON object")
    prompt = lookup(record, fields.prompt)
    if prompt is None:
        raise BadRowError(file, line, fields.prompt, "missing")
    prompt = _validate_prompt(prompt, (file, line, fields.prompt))
    tests = _tests(record, fields, file, line)
    answer_path = answer_field(record, fields)
    answer = lookup(record, answer_path)
    # JSON writers often store numeric answers as numbers; an integer has one exact spelling.
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is None and tests is None:
        raise BadRowError(file, line, answer_path, "missing (a row needs an answer or tests)")
    if answer is not None and not isinstance(answer, str):
        raise BadRowError(file, line, answer_path, f"is {type(answer).__name__}, expected a string")
    raw = record.get(RAW_PROMPT_KEY, False)
    if not isinstance(raw, bool):
        raise BadRowError(file, line, RAW_PROMPT_KEY, f"is {type(raw).__name__}, expected true or false")
    if raw and not isinstance(prompt, str):
        raise BadRowError(file, line, fields.prompt,
                          f"is chat messages, but {RAW_PROMPT_KEY} needs the text to continue")
    data_source = lookup(record, fields.data_source)
    if data_source is not None and not isinstance(data_source, str):
        raise BadRowError(file, line, fields.data_source, f"is {type(data_source).__name__}, expected a string")
    consumed = {fields.prompt, answer_path, fields.data_source, *fields.tests_paths}
    row = {k: v for k, v in record.items() if k not in consumed}
    row["prompt"] = prompt
    if answer is not None:
        row["answer"] = answer
    if tests is not None:
        row["tests"] = tests
    row["data_source"] = data_source if data_source else Path(file).stem
    return row


def read_rows(path: str | Path, fields: RowFields = RowFields(), *, skip_bad_rows: bool = False) -> ReadResult:
    """Read and validate every row of a data file or ``save_to_disk`` folder (:mod:`archer.data.formats`),
    or the rows of a built-in benchmark (``builtin:NAME``, taken as they are).

    Logs one warning per file whose answers are read from ``reward_model.ground_truth`` by
    :func:`answer_field`'s fallback.
    """
    if is_builtin(path):
        return ReadResult(rows=benchmark_rows(str(path)), num_skipped=0)
    rows, num_skipped, fallback_said = [], 0, False
    for line, record, error in iter_records(path):
        try:
            if error is not None:
                raise BadRowError(str(path), line, "<json>", error)
            rows.append(validate_row(record, fields, str(path), line))
            if not fallback_said and answer_field(record, fields) != fields.answer:
                fallback_said = True
                log.warning("%s: no %r field; reading the answers from %r (verl style); give answer_key "
                            "(--answer-key) to choose another field", path, fields.answer, VERL_ANSWER)
        except BadRowError:
            if not skip_bad_rows:
                raise
            num_skipped += 1
    return ReadResult(rows=rows, num_skipped=num_skipped)
