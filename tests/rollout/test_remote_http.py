"""The remote engine's parts and VLLMServerProcess against a stand-in HTTP server (no vLLM, fast):
direct connections despite a proxy in the environment, stale weight folders swept, and a failed
sync resuming the servers before it drains the caller's tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from stand_in_http import stand_in_http

import archer.rollout.remote.files as files
from archer.rollout.remote import WeightSyncError, sweep_stale_weight_dirs
from archer.rollout.remote.client import request
from archer.rollout.remote.files import FilesTransport, make_run_dir
from archer.rollout.remote.fleet import Server, ServerFleet
from archer.rollout.remote.sync import WeightSync
from archer.rollout.server import VLLMServerProcess, free_port


@pytest.fixture
def stand_in():
    """A local HTTP server answering ``{}`` to everything; ``log`` lists "METHOD /path" in order."""
    log: list[str] = []

    def answer(method: str, path: str) -> dict:
        log.append(f"{method} {path}")
        return {}

    with stand_in_http(answer) as url:
        yield url, log


def _proxy_everything(monkeypatch) -> None:
    """An http_proxy pointing at a closed port: any request that honours it fails."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's default opener reads the env again


def test_server_health_and_engine_calls_bypass_an_environment_proxy(stand_in, monkeypatch):
    url, log = stand_in
    _proxy_everything(monkeypatch)
    port = int(url.rsplit(":", 1)[1])
    server = VLLMServerProcess("unused", port=port, grace_s=1)
    server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        server.wait_ready(timeout_s=5)  # through the proxy it would never answer
    finally:
        server.stop()
    assert request(url, "GET", "/health", timeout=5) == {}
    assert log == ["GET /health", "GET /health"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_weight_folders_of_dead_processes_of_this_machine_are_swept(tmp_path):
    host = files._host_tag()
    dead = _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {
            "dead": tmp_path / f"archer-weights-{host}-{dead}-0123abcd",
            "alive": tmp_path / f"archer-weights-{host}-{alive.pid}-0123abcd",
            "mine": tmp_path / f"archer-weights-{host}-{os.getpid()}-0123abcd",
            "other_machine": tmp_path / f"archer-weights-otherhost.example-{dead}-0123abcd",
            "unrelated": tmp_path / "archer-weights-notes",
        }
        for folder in folders.values():
            (folder / "v000001").mkdir(parents=True)
        run_dir = make_run_dir(str(tmp_path))  # what setup does
        assert run_dir.is_dir() and run_dir.name.startswith(f"archer-weights-{host}-{os.getpid()}-")
        assert not folders["dead"].exists()
        assert all(folders[name].exists() for name in ("alive", "mine", "other_machine", "unrelated"))
        assert sweep_stale_weight_dirs(tmp_path) == []  # nothing left to sweep; the new folder is ours
    finally:
        alive.kill()
        alive.wait()


def test_a_failed_sync_resumes_the_servers_before_draining_the_tensors(stand_in, tmp_path):
    url, log = stand_in
    fleet = ServerFleet([url], None, 1, request_timeout_s=5, sync_timeout_s=5, startup_timeout_s=5)
    fleet.servers = [Server(url)]
    (tmp_path / "run").mkdir()
    lock = threading.Lock()
    sync = WeightSync(fleet, FilesTransport(fleet, tmp_path / "run", {"a": (2,), "b": (2,)}), verify=False, tied=None, lock=lock)

    def pairs():
        yield "a", torch.zeros(3)  # a wrong shape: the trainer side fails before any server reads
        log.append("drained")  # the rest is iterated (other ranks' gathers) only after the resume
        yield "b", torch.zeros(2)

    with lock, pytest.raises(WeightSyncError, match="should have shape"):
        sync.push(pairs(), version=1)
    assert log == ["POST /pause", "POST /resume", "drained"]
