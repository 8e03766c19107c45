"""Read prompt rows from local JSONL / Parquet files and validate them.

A row becomes ``{"prompt": str | list[message], "answer": str, "tests": ... (when present),
"data_source": str, **other fields}`` whatever the field names in the file are. A bad row
(broken JSON, a missing field, a wrong type, an empty prompt) raises ``BadRowError`` naming
``file:line:field``, or — with ``skip_bad_rows=True`` — is skipped and counted. Lines are numbered
from 1: the JSONL line, or the row number within a Parquet file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BadRowError", "RowFields", "ReadResult", "read_rows", "validate_row"]

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


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
    """Which fields of a source row hold the prompt, the answer and the (optional) tests."""

    prompt: str = "prompt"
    """Field with the prompt: a non-empty string or a non-empty list of ``{"role", "content"}`` messages."""
    answer: str = "answer"
    """Field with the reference answer (a string; an integer is turned into its decimal string)."""
    tests: str = "tests"
    """Optional field with test cases for code tasks (a list, dict or string); absent or null means none."""


@dataclass
class ReadResult:
    """Rows read from one file."""

    rows: list[dict[str, Any]]
    """Validated rows in file order."""
    num_skipped: int
    """Bad rows skipped (only nonzero with ``skip_bad_rows=True``)."""


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
        return prompt
    raise BadRowError(*where, f"is {type(prompt).__name__}, expected a string or a list of messages")


def validate_row(record: Any, fields: RowFields, file: str, line: int) -> dict[str, Any]:
    """Turn one source record into a row with canonical keys, or raise ``BadRowError``.

    The canonical ``prompt``/``answer``/``tests`` keys replace the source's field names; the
    other fields are kept; ``data_source`` defaults to the file's stem.
    """
    if not isinstance(record, dict):
        raise BadRowError(file, line, "<row>", f"is {type(record).__name__}, expected a JSON object")
    for key in (fields.prompt, fields.answer):
        if key not in record or record[key] is None:
            raise BadRowError(file, line, key, "missing")
    prompt = _validate_prompt(record[fields.prompt], (file, line, fields.prompt))
    answer = record[fields.answer]
    # JSON writers often store numeric answers as numbers; an integer has one exact spelling.
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise BadRowError(file, line, fields.answer, f"is {type(answer).__name__}, expected a string")
    tests = record.get(fields.tests)
    if tests is not None and not isinstance(tests, (list, dict, str)):
        raise BadRowError(file, line, fields.tests, f"is {type(tests).__name__}, expected a list, dict or string")
    row = {k: v for k, v in record.items() if k not in (fields.prompt, fields.answer, fields.tests)}
    row.update(prompt=prompt, answer=answer)
    if tests is not None:
        row["tests"] = tests
    row.setdefault("data_source", Path(file).stem)
    return row


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, record, error)`` for each non-blank line; ``error`` set when the JSON is broken."""
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, None, f"broken JSON: {e.msg} at column {e.colno}"


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield number, record, None


def read_rows(path: str | Path, fields: RowFields = RowFields(), *, skip_bad_rows: bool = False) -> ReadResult:
    """Read and validate every row of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}")
    rows, num_skipped = [], 0
    for line, record, error in records:
        try:
            if error is not None:
                raise BadRowError(str(path), line, "<json>", error)
            rows.append(validate_row(record, fields, str(path), line))
        except BadRowError:
            if not skip_bad_rows:
                raise
            num_skipped += 1
    return ReadResult(rows=rows, num_skipped=num_skipped)
