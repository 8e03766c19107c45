import os

import pytest

from archer.rewards.sandbox import UID_BASE


def _sandbox_leftovers(marker: str) -> list[str]:
    """Processes run by a sandbox uid, or whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if uid >= UID_BASE or marker in cmdline:
            found.append(f"{entry} uid={uid} {cmdline[:120]}")
    return found


@pytest.fixture
def no_leftovers():
    """Yields a marker for hostile programs to put in their processes' command lines; after the
    test, asserts that no sandbox process and no process carrying the marker is alive."""
    marker = f"archer-leftover-{os.getpid()}-{os.urandom(4).hex()}"
    yield marker
    assert _sandbox_leftovers(marker) == []

