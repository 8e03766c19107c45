"""How ``archer`` reports a failure: one line for a user's mistake, the traceback for a bug.

A mistake in a config, a data file or a reward (a bad row, a missing file, a class path that does
not import, a setting out of range, a reward that fails on every call) raises one of
:data:`USER_ERRORS` with a message that names the file, row, field, key or value; ``archer``
prints that message on one line, with the fix where there is one, and exits 1 (no usage dump for a
command line that does not parse). Anything else is a bug and keeps its traceback; ``--verbose``
shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re

from lightning.fabric.utilities.exceptions import MisconfigurationException

from archer.data.rows import BadRowError
from archer.rewards.failures import RewardsFailedError

__all__ = ["USER_ERRORS", "describe", "parser_error_line"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    argparse.ArgumentError,  # a command line or config that does not parse (jsonargparse raises it too)
    ValueError,  # a setting out of range, a bad row (BadRowError), an empty data set, ...
    OSError,  # a missing file or folder, a used run directory (FileExistsError), ...
    ImportError,  # a user's module that does not import
    FloatingPointError,  # update.max_nonfinite_steps reached
    RewardsFailedError,  # model.max_failed_reward_steps reached
    MisconfigurationException,  # Lightning's own checks of the Trainer's settings
)
"""Exceptions that say what the user has to change; reported in one line."""

_NOISE = re.compile(
    r"^(Subtypes:|Errors:|Given value( type)?:|Does not validate against any of the Union subtypes|"
    r"Expected a <class 'NoneType'>)"
)
"""Lines of a jsonargparse error that list what a union's other members expected, not what is wrong."""


def _import_hint(reason: str, class_path: str) -> str:
    """Where Python looked, when the module of ``class_path`` itself is what no folder on the path has."""
    missing = re.match(r"No module named '([^'.]+)", reason)
    if missing is None or missing.group(1) != class_path.split(".")[0] or importlib.util.find_spec(missing.group(1)):
        return ""
    return (f" (archer imports your modules from the working directory {os.getcwd()}, as `python -m` does: "
            f"run it where {missing.group(1)}.py is, or add its folder to PYTHONPATH)")


def _arguments_of(class_path: str) -> str:
    """`` (its arguments: a, b, ...)`` for an importable class, else nothing."""
    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    names = [p for p, v in parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    if any(v.kind == v.VAR_KEYWORD for v in parameters.values()):
        names.append("**kwargs")
    return f" (its arguments: {', '.join(names)})" if names else " (it takes no arguments)"


def parser_error_line(message: str) -> str:
    """jsonargparse's (multi-line) parse error as one line: the key, and for a class path that does not
    import, the path and why (its other lines list every type of a union the value did not match)."""
    key = re.search(r'Parser key "([^"]+)"', message)
    prefix = f"{key.group(1)}: " if key else ""
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if problem:
        class_path, reason = problem.group(1), problem.group(2).strip()
        unknown = re.match(r"Option '([^']+)' is not accepted", reason)
        if unknown:  # the class imported; one of its arguments is misspelt or not its own
            return f"{prefix}{class_path} has no argument {unknown.group(1)!r}{_arguments_of(class_path)}"
        return f"{prefix}class_path {class_path!r} does not import: {reason}{_import_hint(reason, class_path)}"
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip()).lstrip("- ") for line in message.splitlines()]
    lines = [line for line in lines if line and not _NOISE.match(line)]
    return prefix + "; ".join(dict.fromkeys(lines))


def _hint(error: BaseException, command: str) -> str:
    """The fix, in the words of the command that failed, where one is known."""
    if isinstance(error, BadRowError):
        if command in ("fit", "validate"):
            return ("choose the fields with data.prompt_key / data.answer_key (`archer data inspect FILE --model "
                    "MODEL` shows a file's fields), or skip bad rows with data.skip_bad_rows: true")
        return "choose the fields with --prompt-key / --answer-key, or skip bad rows with --skip-bad-rows"
    return ""


def describe(error: BaseException, command: str) -> str:
    """``error`` as the one line ``archer COMMAND`` prints."""
    if isinstance(error, argparse.ArgumentError):
        message = parser_error_line(str(error))
        if "does not import" not in message:
            message += f" (`archer {command} --help` lists the options)" if command else " (`archer --help`)"
        return f"archer {command}: {message}".replace("archer : ", "archer: ")
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ImportError) and type(error).__name__ not in message:
        message = f"{type(error).__name__}: {message}"
    hint = _hint(error, command)
    return f"archer {command}: {message}" + (f" — {hint}" if hint else "")
