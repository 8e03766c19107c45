"""``samples.jsonl``: one line per sampled response, the record every eval figure is computed from.

Each line is a :class:`SampleRecord`. Lines are appended one chunk of problems at a time and
flushed, so a killed eval leaves every finished chunk on disk, plus at most a partial chunk and
a torn last line. :func:`load_records` drops the torn line (truncating the file back to its last
complete line) so appending can go on; the eval redoes chunks that are incomplete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["SampleRecord", "load_records", "append_records", "rewrite_records"]


@dataclass(frozen=True)
class SampleRecord:
    """One sampled response and its grade."""

    dataset: str
    """Data set name (the NAME of ``--data NAME=FILE``)."""
    problem: int
    """Index of the problem in its data set (0-based, file order)."""
    sample: int
    """Index of the sample among the problem's n (0-based)."""
    response: str
    """The decoded response."""
    answer: str | None
    """The answer the reward extracted (math), None when it extracted none or does not extract."""
    score: float
    """The reward's score (correct iff >= 1)."""
    length: int
    """Response length in tokens (with the EOS token when it stopped)."""
    truncated: bool
    """It hit the token limit instead of stopping."""


def load_records(path: str | Path) -> list[SampleRecord]:
    """Every complete record of ``path`` (none if it does not exist); a torn last line is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a write was killed mid-line
        with path.open("r+b") as f:
            f.truncate(end)
    records = []
    # Split on b"\n" only: ``str.splitlines`` also splits on U+2028, U+2029 and U+0085, which
    # ``json.dumps(..., ensure_ascii=False)`` writes unescaped inside a response's string.
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            records.append(SampleRecord(**json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a sample record ({error}); move the file away to start over") from error
    return records


def append_records(path: str | Path, records: Iterable[SampleRecord]) -> None:
    """Append ``records`` as lines and flush them to disk."""
    with Path(path).open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_records(path: str | Path, records: Iterable[SampleRecord]) -> None:
    """Replace ``path`` by exactly ``records`` (written to a temporary file, then renamed over it)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    append_records(temporary, records)
    os.replace(temporary, path)
