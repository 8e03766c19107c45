"""Test cases of code problems, from the formats data sets ship them in, to :mod:`archer.rewards.code`'s.

The sandbox runs three kinds of test dict (``archer/rewards/code.py``): stdin/stdout
``{"input", "output"}``, function call ``{"fn_name", "input", "output"}`` and ``{"assert"}``.
:func:`normalize_tests` turns each of these source formats into a list of them:

* Archer's own list (returned as it is, after a shape check);
* LiveCodeBench rows' test lists ``[{"input", "output", "testtype": "stdin" | "functional"}]``:
  a functional test calls the function named by its ``metadata.func_name`` (``metadata`` a dict
  or a JSON string) or, failing that, by the row's ``fn_name`` argument; its input already is one
  JSON value per line, the positional arguments;
* TACO / APPS ``{"inputs": [...], "outputs": [...], "fn_name"?}`` (verl's ``prime_code`` ground
  truth too): without ``fn_name`` each input/output is a string (or a list of lines); with it each
  input is the list of arguments, and — as the APPS checker does — the function's result passes
  when it equals the output or, for a one-element list output, that element
  (``"alt_outputs"``);
* a JSON string of any of these, or LiveCodeBench's compressed private tests: base64 of zlib of a
  pickled JSON string. That pickle is loaded with an unpickler that refuses every global, so it
  can produce only plain values (strings, numbers, lists, dicts), never run code; a pickle that
  is not a string is an error.

Any other shape raises ``ValueError`` with what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import zlib
from typing import Any

__all__ = ["normalize_tests", "decode_compressed"]

MAX_DECOMPRESSED_BYTES = 1 << 30
"""Largest decompressed test payload accepted (a guard against zlib bombs)."""


class _PlainValueUnpickler(pickle.Unpickler):
    """Loads only values that need no global: no class, function or module can be named."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: test pickles may only hold a string")


def decode_compressed(text: str) -> Any:
    """``json.loads(pickle.loads(zlib.decompress(base64.b64decode(text))))`` with a pickle that can
    hold only a string (LiveCodeBench's ``private_test_cases``). Raises ValueError otherwise."""
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_DECOMPRESSED_BYTES)
    except (binascii.Error, UnicodeEncodeError, zlib.error) as error:
        raise ValueError(f"neither JSON nor base64+zlib compressed tests ({error})") from error
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed tests inflate past {MAX_DECOMPRESSED_BYTES} bytes")
    try:
        payload = _PlainValueUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError) as error:
        raise ValueError(f"compressed tests: not a pickled string ({error})") from error
    if not isinstance(payload, str):
        raise ValueError(f"compressed tests: the pickle holds a {type(payload).__name__}, expected a JSON string")
    try:
        return json.loads(payload)
    except json.JSONDecodeError as error:
        raise ValueError(f"compressed tests: the pickled string is not JSON ({error})") from error


def _decode_string(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return decode_compressed(text.strip())


def _lines(value: Any, what: str) -> str:
    """A stdin/stdout value: a string, or a list of lines joined with newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    raise ValueError(f"{what}: expected a string or a list of lines, got {value!r:.100}")


def _func_name(test: dict, fallback: str | None, index: int) -> str:
    metadata = test.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata) if metadata.strip() else {}
    name = metadata.get("func_name") if isinstance(metadata, dict) else None
    name = name or fallback
    if not isinstance(name, str) or not name:
        raise ValueError(f"tests[{index}]: a functional test needs metadata.func_name (or the row's fn_name)")
    return name


def _from_livecodebench(tests: list[dict], fn_name: str | None) -> list[dict]:
    out = []
    for index, test in enumerate(tests):
        if not isinstance(test.get("input"), str) or not isinstance(test.get("output"), str):
            raise ValueError(f"tests[{index}]: a LiveCodeBench test needs string 'input' and 'output'")
        if test["testtype"] == "stdin":
            out.append({"input": test["input"], "output": test["output"]})
        elif test["testtype"] == "functional":
            out.append({"fn_name": _func_name(test, fn_name, index), "input": test["input"], "output": test["output"]})
        else:
            raise ValueError(f"tests[{index}]: testtype {test['testtype']!r}, expected 'stdin' or 'functional'")
    return out


def _from_taco(spec: dict) -> list[dict]:
    inputs, outputs, fn_name = spec["inputs"], spec["outputs"], spec.get("fn_name")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError("tests: 'inputs' and 'outputs' must be lists of the same length")
    if not fn_name:
        return [{"input": _lines(i, f"inputs[{n}]"), "output": _lines(o, f"outputs[{n}]")}
                for n, (i, o) in enumerate(zip(inputs, outputs))]
    tests = []
    for n, (arguments, expected) in enumerate(zip(inputs, outputs)):
        if not isinstance(arguments, list):
            raise ValueError(f"inputs[{n}]: a call test's input is the list of arguments, got {arguments!r:.100}")
        test = {"fn_name": fn_name, "input": "\n".join(json.dumps(a) for a in arguments), "output": json.dumps(expected)}
        if isinstance(expected, list) and len(expected) == 1:
            test["alt_outputs"] = [json.dumps(expected[0])]
        tests.append(test)
    return tests


def _check_native(tests: list[dict]) -> list[dict]:
    for index, test in enumerate(tests):
        if "assert" in test:
            if not isinstance(test["assert"], str):
                raise ValueError(f"tests[{index}]: 'assert' must be a string")
        elif not {"input", "output"} <= test.keys():
            raise ValueError(
                f"tests[{index}]: expected {{'input', 'output'}} (optionally 'fn_name'), {{'assert'}}, a LiveCodeBench "
                f"test with 'testtype', or a TACO {{'inputs', 'outputs'}} dict; got {test!r:.200}"
            )
        elif not isinstance(test["input"], str) or not isinstance(test["output"], str):
            raise ValueError(f"tests[{index}]: 'input' and 'output' must be strings")
    return tests


def normalize_tests(tests: Any, fn_name: str | None = None) -> list[dict]:
    """``tests`` in any format of the module docstring as a list of Archer test dicts.

    Args:
        tests: the list, dict or string the data set holds.
        fn_name: the function LiveCodeBench functional tests call when a test names none (raw
            LiveCodeBench rows keep it in the row's ``metadata``).
    """
    if isinstance(tests, str):
        tests = _decode_string(tests)
    if isinstance(tests, dict):
        if {"inputs", "outputs"} <= tests.keys():
            return _from_taco(tests)
        raise ValueError(f"tests: a dict must be TACO-style {{'inputs', 'outputs', 'fn_name'?}}, got keys {sorted(tests)}")
    if not isinstance(tests, list):
        raise ValueError(f"tests: expected a list of test dicts, got {type(tests).__name__}")
    for index, test in enumerate(tests):
        if not isinstance(test, dict):
            raise ValueError(f"tests[{index}]: expected a dict, got {type(test).__name__}")
    if tests and all("testtype" in test for test in tests):
        return _from_livecodebench(tests, fn_name)
    return _check_native(tests)
