"""Run a markdown document's code blocks in order, as a reader would type them.

- a ``python``/``yaml`` block whose first line is ``# NAME.py`` / ``# NAME.yaml`` is a file: written
  to NAME in the working directory;
- any other ``python`` block runs in one namespace shared by the document's blocks;
- a ``bash`` block runs line by line (``\\`` continues a line): ``archer ...`` in-process
  (``archer.cli.main``), ``python FILE.py`` as a script; any other command is an error (a document run
  by a test uses only these);
- other blocks (``text``, ``console``) are not run.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

from archer.cli import main

__all__ = ["code_blocks", "run_markdown"]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
FILE_HEADER = re.compile(r"# ([\w./-]+\.(?:py|yaml))\n")


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order."""
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(markdown)]


def _commands(body: str) -> list[str]:
    lines, current = [], ""
    for line in body.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip() and not current.lstrip().startswith("#"):
                lines.append(current.strip())
            current = ""
    return lines


def _run_command(command: str) -> None:
    words = shlex.split(command, comments=True)
    if words[0] == "archer":
        try:
            main(words[1:])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise AssertionError(f"`{command}` failed: {stop.code}") from stop
    elif words[0] == "python" and len(words) == 2 and words[1].endswith(".py"):
        runpy.run_path(words[1], run_name="__main__")
    else:
        raise AssertionError(f"the document runs `{command}`; its test only runs `archer ...` and `python FILE.py`")


def run_markdown(markdown: str, cwd: Path) -> dict:
    """Run the blocks of ``markdown`` in ``cwd`` (the caller chdirs there); the python namespace."""
    namespace: dict = {"__name__": "__doc__"}
    for language, body in code_blocks(markdown):
        header = FILE_HEADER.match(body)
        if language in ("python", "yaml") and header:
            path = cwd / header.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
            if path.suffix == ".py":  # another document's module of the same name must not be reused
                sys.modules.pop(".".join(path.relative_to(cwd).with_suffix("").parts), None)
        elif language == "python":
            exec(compile(body, "<markdown>", "exec"), namespace)  # noqa: S102 - the document's own code
        elif language == "bash":
            for command in _commands(body):
                _run_command(command)
    return namespace
