"""``archer data inspect FILE --model MODEL_DIR``: what a data file holds, seen through a tokenizer.

Prints the file's schema (before reading any row, so that a bad row's error comes after the field
names the file has), its row count (and bad rows), the token-length percentiles of the
rendered prompts (chat template and prompt template applied, what ``max_prompt_length`` is
compared with) and of the reference answers, and one rendered prompt — enough to choose
``max_prompt_length`` and the field names before a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archer.data.datamodule import render_row
from archer.data.formats import schema_of
from archer.data.rows import RowFields, read_rows

__all__ = ["PERCENTILES", "DataSummary", "nearest_rank_percentile", "summarize", "format_schema", "format_summary"]

PERCENTILES = (50, 90, 99, 100)


def nearest_rank_percentile(values: list[int], q: float) -> int:
    """The smallest value with at least ``q`` percent of ``values`` at or below it (nearest rank)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class DataSummary:
    """What :func:`summarize` found in one data file."""

    path: str
    num_rows: int
    num_bad_rows: int
    """Bad rows skipped (reading stops at the first one unless ``skip_bad_rows``)."""
    num_with_tests: int
    prompt_tokens: dict[int, int]
    """Percentile -> rendered prompt length in tokens."""
    answer_tokens: dict[int, int]
    """Percentile -> answer length in tokens (empty when no row has an answer)."""
    example: str
    """The first row's rendered prompt."""


def summarize(
    path: str | Path,
    tokenizer: Any,
    fields: RowFields = RowFields(),
    *,
    apply_chat_template: bool = True,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    skip_bad_rows: bool = False,
) -> DataSummary:
    """Read ``path`` as training would and measure it with ``tokenizer``."""
    result = read_rows(path, fields, skip_bad_rows=skip_bad_rows)
    if not result.rows:
        raise ValueError(f"{path}: no usable row ({result.num_skipped} bad)")
    rendered = [
        render_row(
            row, tokenizer, apply_chat_template=apply_chat_template,
            system_prompt=system_prompt, prompt_template=prompt_template,
        )
        for row in result.rows
    ]
    prompt_lengths = [len(ids) for _, ids in rendered]
    answer_lengths = [
        len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) for row in result.rows if "answer" in row
    ]
    return DataSummary(
        path=str(path),
        num_rows=len(result.rows),
        num_bad_rows=result.num_skipped,
        num_with_tests=sum("tests" in row for row in result.rows),
        prompt_tokens={q: nearest_rank_percentile(prompt_lengths, q) for q in PERCENTILES},
        answer_tokens={q: nearest_rank_percentile(answer_lengths, q) for q in PERCENTILES} if answer_lengths else {},
        example=rendered[0][0],
    )


def _percentile_line(name: str, lengths: dict[int, int]) -> str:
    if not lengths:
        return f"{name}: none"
    return f"{name}: " + "  ".join(f"{'max' if q == 100 else f'p{q}'} {value}" for q, value in lengths.items())


def format_schema(path: str | Path) -> str:
    """The first part of ``archer data inspect``'s report: the file and its columns with their types.

    It reads no row, so it is printed before the rows are validated: when one is bad, the error
    comes after the field names the file does have.
    """
    return "\n".join([f"file: {path}", "schema:", *(f"  {name}: {dtype}" for name, dtype in schema_of(path))])


def format_summary(summary: DataSummary) -> str:
    """The rest of the report ``archer data inspect`` prints (after :func:`format_schema`)."""
    lines = [f"rows: {summary.num_rows} ({summary.num_bad_rows} bad skipped, {summary.num_with_tests} with tests)"]
    lines.append(_percentile_line("prompt tokens", summary.prompt_tokens))
    lines.append(_percentile_line("answer tokens", summary.answer_tokens))
    lines += ["first prompt, rendered:", "-" * 40, summary.example, "-" * 40]
    return "\n".join(lines)
