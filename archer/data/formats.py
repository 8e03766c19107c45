"""Records of the file formats prompt data comes in, numbered for error messages.

* ``.jsonl``: one JSON object per line; records are numbered by line (blank lines count).
* ``.json``: a JSON array of objects (DeepScaleR / DAPO-Math / LiveCodeBench exports), numbered
  by element from 1; a ``.json`` file that does not start with ``[`` is read as JSONL.
* ``.parquet`` (verl, Hugging Face hub exports): numbered by row from 1.
* ``.arrow``: an Arrow IPC stream or file, numbered by row from 1.
* a ``Dataset.save_to_disk`` folder (``state.json``, ``dataset_info.json`` and
  ``data-0000i-of-0000n.arrow`` IPC stream files), rows numbered across its files; a
  ``DatasetDict`` folder (``dataset_dict.json``, one such folder per split) with a single split
  is read as that split, with several it must be given as ``FOLDER/SPLIT``.
* ``builtin:NAME``: a built-in benchmark's rows (:mod:`archer.data.benchmarks`), read from an
  installed package, numbered from 1; they are already in Archer's row form.

JSON text is UTF-8, with or without a byte-order mark (Windows editors and some exporters write
one; read as plain UTF-8 it would break the first record or hide a JSON array's ``[``).

Only pyarrow is needed: Hugging Face ``datasets`` is not imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archer.data.benchmarks import benchmark_rows, is_builtin

__all__ = ["FILE_SUFFIXES", "iter_records", "schema_of", "resolve_dataset_folder"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")

TEXT_ENCODING = "utf-8-sig"
"""UTF-8 that drops a leading byte-order mark (and reads files without one unchanged)."""

Record = tuple[int, Any, "str | None"]
"""``(number, record, error)``: ``error`` is set (and ``record`` None) when the record cannot be parsed."""


def resolve_dataset_folder(folder: Path) -> Path:
    """The ``save_to_disk`` Dataset folder ``folder`` stands for (itself, or a DatasetDict's only split)."""
    if (folder / "state.json").is_file():
        return folder
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text())["splits"]
        if len(splits) == 1:
            return resolve_dataset_folder(folder / splits[0])
        raise ValueError(f"{folder} is a DatasetDict with splits {splits}: give one of them, e.g. {folder / splits[0]}")
    raise ValueError(f"{folder}: not a `save_to_disk` folder (no state.json or dataset_dict.json)")


def _arrow_files(folder: Path) -> list[Path]:
    dataset = resolve_dataset_folder(folder)
    state = json.loads((dataset / "state.json").read_text())
    return [dataset / entry["filename"] for entry in state["_data_files"]]


def _open_arrow(path: Path) -> Any:
    """A reader of batches over an Arrow IPC stream (``save_to_disk``'s format) or IPC file."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path)))


def _arrow_batches(path: Path) -> Iterator[Any]:
    reader = _open_arrow(path)
    if hasattr(reader, "num_record_batches"):  # IPC file format
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
    else:
        yield from reader


def _table_records(batches: Iterator[Any]) -> Iterator[Record]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield number, record, None


def _jsonl_records(path: Path) -> Iterator[Record]:
    with path.open(encoding=TEXT_ENCODING) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, None, f"broken JSON: {e.msg} at column {e.colno}"


def _starts_with_array(path: Path) -> bool:
    with path.open(encoding=TEXT_ENCODING) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith("[")
    return False


def _json_array_records(path: Path) -> Iterator[Record]:
    try:
        records = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except json.JSONDecodeError as e:
        # The whole array is unusable; report where the JSON breaks (its text line).
        yield e.lineno, None, f"broken JSON array: {e.msg} at line {e.lineno} column {e.colno}"
        return
    for number, record in enumerate(records, start=1):
        yield number, record, None


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every record of ``path`` (any format of the module docstring), in order."""
    if is_builtin(path):
        return ((number, row, None) for number, row in enumerate(benchmark_rows(str(path)), start=1))
    path = Path(path)
    if path.is_dir():
        files = _arrow_files(path)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{path}: state.json lists {file.name}, which is missing")
        return _table_records(batch for file in files for batch in _arrow_batches(file))
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_with_array(path)):
        return _jsonl_records(path)
    if suffix == ".json":
        return _json_array_records(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _table_records(iter(pq.ParquetFile(path).iter_batches()))
    if suffix == ".arrow":
        return _table_records(_arrow_batches(path))
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {FILE_SUFFIXES} or a save_to_disk folder")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_json_type(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return f"list<{_json_type(value[0]) if value else 'empty'}>"
    return type(value).__name__


def schema_of(path: str | Path, sample_rows: int = 100) -> list[tuple[str, str]]:
    """``(column, type)`` pairs: the Arrow schema of Parquet/Arrow data, or for JSON the types seen
    in the first ``sample_rows`` records (several types joined with ``|``), as for a built-in benchmark's rows."""
    if not is_builtin(path) and (Path(path).is_dir() or Path(path).suffix.lower() in (".parquet", ".arrow")):
        path = Path(path)
        if path.is_dir():
            schema = _open_arrow(_arrow_files(path)[0]).schema
        elif path.suffix.lower() == ".arrow":
            schema = _open_arrow(path).schema
        else:
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
        return [(field.name, str(field.type)) for field in schema]
    seen: dict[str, dict[str, None]] = {}
    for count, (_, record, _error) in enumerate(iter_records(path)):
        if count >= sample_rows:
            break
        if isinstance(record, dict):
            for key, value in record.items():
                seen.setdefault(key, {})[_json_type(value)] = None
    return [(key, " | ".join(types)) for key, types in seen.items()]
