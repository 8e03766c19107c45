"""``RemoteVLLMEngine``: rollouts from one or more vLLM servers over HTTP, weights pushed at each sync.

The servers are vLLM's OpenAI-compatible server with its RL routes, either started elsewhere
(``urls``) or started by the engine on this machine (``launch: true``). Only the standard library
talks HTTP; vLLM itself is needed on this side only for the ``nccl`` transport. The parts, one file
each:

* :mod:`~archer.rollout.remote.engine`: :class:`RemoteVLLMEngine`, the
  :class:`~archer.rollout.RolloutEngine` that composes the others (arguments, the pool of generate
  requests, which rank pushes, the version count, the sync lock).
* :mod:`~archer.rollout.remote.fleet`: the servers: launched or attached, health, inspection,
  least-busy choice for each request, and the routes a sync calls (pause, reload, label, reset,
  resume, checksums).
* :mod:`~archer.rollout.remote.client`: one HTTP call with its timeout, and the errors
  (:class:`RemoteServerError`, :class:`RemoteServerTimeout`).
* :mod:`~archer.rollout.remote.sampling`: a prompt's ``/inference/v1/generate`` request and the
  completions of its answer (log-probs μ, weight versions).
* :mod:`~archer.rollout.remote.sync`: one weight sync on every server (pause → transfer → verify →
  label → reset prefix cache → resume) and the rollback of a failed server
  (:class:`WeightSyncError`), over a :class:`~archer.rollout.remote.sync.WeightTransport`:
* :mod:`~archer.rollout.remote.files` (safetensors in a folder every server reads; CPU, CI) or
  :mod:`~archer.rollout.remote.nccl` (vLLM's NCCL weight transfer; GPU);
* :mod:`~archer.rollout.remote.checksums`: whether a server holds the tensors we sent.

Ranks. With ``launch: true`` each training rank starts and syncs its own servers. With ``urls``
the servers are shared: only global rank 0 pushes weights; every rank still iterates the tensors
(FSDP gathers are collectives) and counts versions, so version numbers agree across ranks.

Threads. ``generate`` may run on any number of threads at once, also while another thread runs
``load_weights``: its requests simply wait out the pause. ``load_weights`` and ``verify`` are
serialised by a lock.
"""

from archer.rollout.remote.checksums import compare_checksums, tensor_digest
from archer.rollout.remote.client import RemoteServerError, RemoteServerTimeout
from archer.rollout.remote.engine import RemoteVLLMEngine
from archer.rollout.remote.files import sweep_stale_weight_dirs, write_safetensors
from archer.rollout.remote.nccl import rank_offsets
from archer.rollout.remote.sync import WeightSyncError

__all__ = [
    "RemoteServerError",
    "RemoteServerTimeout",
    "RemoteVLLMEngine",
    "WeightSyncError",
    "compare_checksums",
    "rank_offsets",
    "sweep_stale_weight_dirs",
    "tensor_digest",
    "write_safetensors",
]
