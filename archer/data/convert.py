"""``archer data convert IN OUT``: any supported data file -> Archer's normalised rows.

The output rows have the canonical keys ``prompt`` (with the prompt template baked in, when one
is given), ``answer`` (when the row has one), ``tests`` (Archer test dicts, when it has tests)
and ``data_source``, plus the source's other fields; so a training or eval config reads them with
the default field names. ``OUT`` is ``.jsonl`` or ``.parquet``; in Parquet the tests are stored as
a JSON string (test dicts of different kinds would otherwise be merged into one struct type that
adds null fields), which every reader of tests accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

from archer.data.rows import RowFields, read_rows
from archer.data.template import apply_prompt_template

__all__ = ["OUTPUT_SUFFIXES", "convert_rows"]

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def convert_rows(
    source: str | Path,
    out: str | Path,
    fields: RowFields = RowFields(),
    *,
    prompt_template: str | None = None,
    skip_bad_rows: bool = False,
) -> tuple[int, int]:
    """Write the validated rows of ``source`` to ``out``; return ``(rows written, bad rows skipped)``."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: write {' or '.join(OUTPUT_SUFFIXES)}")
    result = read_rows(source, fields, skip_bad_rows=skip_bad_rows)
    rows = [{**row, "prompt": apply_prompt_template(row["prompt"], prompt_template)} for row in result.rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for row in rows:
            if "tests" in row:
                row["tests"] = json.dumps(row["tests"])
        # from_pylist takes its columns from the first row: give every row every column (null if absent).
        columns = list(dict.fromkeys(key for row in rows for key in row))
        try:
            table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ValueError(f"{source}: the rows' fields have types Parquet cannot hold in one column "
                             f"({error}); write .jsonl instead") from error
        pq.write_table(table, out)
    return len(rows), result.num_skipped
