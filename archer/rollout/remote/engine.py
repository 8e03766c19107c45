"""``RemoteVLLMEngine``: the :class:`~archer.rollout.RolloutEngine` over vLLM servers, composed of
the fleet (:mod:`~archer.rollout.remote.fleet`), the request format
(:mod:`~archer.rollout.remote.sampling`) and the weight sync (:mod:`~archer.rollout.remote.sync`
with a transport from :mod:`~archer.rollout.remote.files` or :mod:`~archer.rollout.remote.nccl`).

What stays here: the arguments, the thread pool of generate requests, which rank pushes weights,
the version count, and the lock that serialises ``load_weights`` and ``verify``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.parse
import weakref
from collections.abc import Iterable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from archer.rollout.base import Completion, SamplingConfig
from archer.rollout.remote.checksums import verify_server
from archer.rollout.remote.files import FilesTransport, make_run_dir
from archer.rollout.remote.fleet import LaunchOptions, Server, ServerFleet, each
from archer.rollout.remote.nccl import NCCLTransport
from archer.rollout.remote.sampling import completions, generate_bodies
from archer.rollout.remote.sync import WeightSync, WeightSyncError, WeightTransport

__all__ = ["RemoteVLLMEngine"]


def _close_resources(fleet: ServerFleet, pool: ThreadPoolExecutor) -> None:
    """Stop launched servers and the request pool (``close``, GC, exit)."""
    fleet.stop()
    pool.shutdown(wait=False, cancel_futures=True)


def _tied_embeddings(actor: nn.Module | None, model_path: str) -> bool | None:
    """Whether the model ties its input and output embeddings (None: cannot tell)."""
    config = getattr(actor, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        return bool(config.tie_word_embeddings)
    with contextlib.suppress(OSError, ValueError, TypeError):
        return bool(json.loads((Path(model_path) / "config.json").read_text()).get("tie_word_embeddings", False))
    return None


class _FleetTimeout:
    """An engine attribute that is the fleet's attribute of the same name (set it at any time:
    each call reads its timeout when it starts)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: RemoteVLLMEngine | None, owner: type | None = None) -> Any:
        return self if engine is None else getattr(engine.fleet, self.name)

    def __set__(self, engine: RemoteVLLMEngine, value: float) -> None:
        setattr(engine.fleet, self.name, value)


class RemoteVLLMEngine:
    """Rollouts from vLLM servers over HTTP; the actor's weights are pushed to every server at each
    ``load_weights`` (see :mod:`archer.rollout.remote` for the protocol).

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

    serves_during_sync = True
    """``generate`` may run on another thread while ``load_weights`` runs (requests wait out the pause),
    and each sample reports the weight version that drew it: what asynchronous rollouts need."""

    request_timeout_s = _FleetTimeout()
    sync_timeout_s = _FleetTimeout()
    startup_timeout_s = _FleetTimeout()

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
        self.weights_dir = weights_dir
        self.transport = ("nccl" if torch.cuda.is_available() else "files") if transport == "auto" else transport
        self.verify_syncs = verify
        self.max_concurrency = max_concurrency
        self.nccl_master_address = nccl_master_address
        self.nccl_master_port = nccl_master_port
        options = LaunchOptions(
            dtype=dtype, max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, seed=seed,
            launch_args=list(launch_args or []), launch_env=dict(launch_env or {}), host=host, log_dir=log_dir,
            nccl=self.transport == "nccl",
        )  # fmt: skip
        self.fleet = ServerFleet(self.urls, options if launch else None, num_servers, request_timeout_s, sync_timeout_s, startup_timeout_s)

        self.version = 0
        """Weight version: 0 after ``setup``, +1 when a ``load_weights`` call ends (failed ones too)."""
        self._weights: WeightSync | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._sync_lock = threading.Lock()  # load_weights / verify
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    @property
    def servers(self) -> list[Server]:
        """The servers, in order (empty before ``setup``)."""
        return self.fleet.servers

    @property
    def endpoint(self) -> str:
        """What a rollout waits on, in the watchdog's messages."""
        urls = [server.url for server in self.servers] or self.urls
        return "vLLM servers " + (", ".join(urls) if urls else "(being launched)")

    @property
    def last_sync_seconds(self) -> float | None:
        """Wall time of the latest weight sync (pause → resume, writing the files included)."""
        return None if self._weights is None else self._weights.last_seconds

    # ------------------------------------------------------------------ setup / close

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Launch the servers (``launch: true``) or wait for ``urls`` to answer, check that each runs
        with the routes and flags the engine needs, then push the actor's weights as version 0
        (``actor=None``: label the servers' current weights version 0)."""
        if self.servers:
            raise RuntimeError("RemoteVLLMEngine.setup called twice")
        tied = _tied_embeddings(actor, model_path)
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="archer-generate")
        # What every sync must look like (names, dtypes, full shapes), read here on every rank: reading a
        # LoRA actor's merged weights runs the FSDP2 gathers, which the sender must not run alone later.
        layout = None if actor is None else [(name, p.dtype, tuple(p.shape)) for name, p in actor.named_parameters(remove_duplicate=False)]
        transport: WeightTransport
        if self.transport == "files":
            shapes = None if layout is None else {name: shape for name, _, shape in layout}
            transport = FilesTransport(self.fleet, make_run_dir(self.weights_dir), shapes)
        else:
            transport = NCCLTransport(self.fleet, layout, self.nccl_master_address, self.nccl_master_port)
        self._weights = WeightSync(self.fleet, transport, self.verify_syncs, tied, self._sync_lock)
        # Stops the servers and the pool at close(), garbage collection or exit (the files
        # transport removes its folder the same way).
        self._finalizer = weakref.finalize(self, _close_resources, self.fleet, self._pool)
        try:
            self.fleet.start(model_path)
            if self.launch and self.verify_syncs:  # a launched server holds its checkpoint: remember it
                self.fleet.record_checkpoint_checksums()
            from archer.rollout.vllm import named_full_tensors

            if not self._is_sender():
                if actor is not None:  # take part in the sender's gathers of sharded parameters
                    for _ in named_full_tensors(actor):
                        pass
                return
            if actor is not None:
                with self._sync_lock:
                    self._weights.push(named_full_tensors(actor), version=0)
            else:
                self._weights.label(0)
        except BaseException:
            if self.launch:  # do not leave servers running behind a failed setup
                self.close()
            raise

    def close(self) -> None:
        """Release the transport, stop launched servers, drop the thread pool; idempotent. Calls in
        flight on other threads then fail with an error naming their server."""
        self._closed = True
        if self._weights is not None:
            self._weights.transport.close()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RemoteVLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _is_sender(self) -> bool:
        """Launched servers belong to this rank; shared ``urls`` are pushed to by global rank 0 only."""
        if self.launch:
            return True
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _require_pool(self) -> ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("RemoteVLLMEngine is closed")
        if self._pool is None or not self.servers:
            raise RuntimeError("RemoteVLLMEngine used before setup(actor, tokenizer, model_path)")
        return self._pool

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
        futures = [pool.submit(self._generate_one, body, sampling.n) for body in generate_bodies(prompt_token_ids, sampling)]
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
        url, response = self.fleet.generate(body)
        return completions(response, n, url)

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push ``(hf_name, tensor)`` pairs to every server as the next weight version. Every rank
        calls this at the same point; see :mod:`archer.rollout.remote` for what each rank does."""
        self._require_pool()
        assert self._weights is not None  # set by setup, as the pool
        with self._sync_lock:
            version = self.version + 1
            try:
                if not self._is_sender():
                    for _ in named_tensors:  # take part in the gathers of sharded parameters
                        pass
                    return
                self._weights.push(named_tensors, version)
            finally:
                # Counted once the sync is over (failed ones too, so every rank counts the same): a
                # reader of `version` (an asynchronous producer) never sees a version still arriving.
                self.version = version

    def verify(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Check that every server holds ``named_tensors`` (cast to its dtype) with vLLM's
        ``/weight_checker`` checksums (:mod:`~archer.rollout.remote.checksums` says what can be
        compared). Returns url → number of parameters compared; raises :class:`WeightSyncError` on
        a mismatch, or when nothing could be compared on a server."""
        tensors = dict(named_tensors)
        with self._sync_lock:
            results = each(self.servers, lambda s: verify_server(self.fleet, s, tensors))
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
