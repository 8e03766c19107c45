"""One weight sync on every server: pause, transfer, verify, label, reset, resume; rollback on failure.

The protocol, the same on every server: ``POST /pause?mode=keep`` (requests in flight are frozen,
not dropped) → transfer (a :class:`WeightTransport`: :mod:`~archer.rollout.remote.files` or
:mod:`~archer.rollout.remote.nccl`) → optionally verify the checksums
(:mod:`~archer.rollout.remote.checksums`) → ``POST /update_weight_version`` → ``POST
/reset_prefix_cache`` with ``reset_running_requests=true`` → ``POST /resume``, the resume in a
``finally``. Resetting the running requests makes the frozen ones recompute their KV cache with the
new weights when they resume, so every token after a sync is sampled by the new weights alone; the
tokens before it keep the old version in their span, and the completion reports the old (oldest)
version — it is as stale as its stalest token.

Failures. Every server is resumed in a ``finally``, whatever failed, before the rest of a failed
sync's tensors is drained (the FSDP gathers of the other ranks). A server that cannot pause fails
the whole sync: all stay at their version. A server whose transfer or verification fails reloads
its last good weights (its previous folder, else the checkpoint it was started from, labelled
version ``-1``), is checked, and resumed. :class:`WeightSyncError` names each failed server, the
phase, the version and what the server holds now.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import torch

from archer.rollout.remote.checksums import verify_server
from archer.rollout.remote.client import RemoteServerError
from archer.rollout.remote.fleet import Server, ServerFleet, each

__all__ = ["WeightSync", "WeightSyncError", "WeightTransport"]

logger = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A weight sync failed on at least one server; ``failures`` maps each server URL to what
    happened there. Every server was resumed (or the message says it could not be)."""

    def __init__(self, version: int, failures: Mapping[str, str]) -> None:
        lines = "\n".join(f"  {url}: {what}" for url, what in failures.items())
        super().__init__(f"weight sync to version {version} failed on {len(failures)} server(s):\n{lines}")
        self.version = version
        self.failures = dict(failures)


class WeightTransport(Protocol):
    """How the tensors of a sync reach the (paused) servers."""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> tuple[str | None, dict[str, BaseException | None]]:
        """Load the tensors into every server. Returns the folder a server can reload them from
        later (its rollback once they are verified; None when the transport keeps no copy) and
        url → error (None: loaded). Raises when the trainer side fails (before any server loads)."""

    def prune(self) -> None:
        """Delete the copies no server holds any more (after every sync, failed ones too)."""

    def close(self) -> None:
        """Release what the transport holds (while the servers still run); idempotent."""


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


def _failed(phase: str, errors: Mapping[str, BaseException | None]) -> dict[str, str]:
    return {url: f"failed at {phase}: {e}" for url, e in errors.items() if e is not None}


class WeightSync:
    """Pushes weight versions to the fleet (see the module docstring).

    Args:
        fleet: The servers.
        transport: How the tensors travel.
        verify: Compare every server's checksums with the sent tensors after each transfer; a
            mismatch fails the server (and rolls it back).
        tied: Whether the model ties its input and output embeddings (None: unknown); a rollback
            to a checkpoint folder cannot restore a tied LM head, and says so.
        lock: Held by the caller around every :meth:`push` (syncs and their rollbacks never interleave).
    """

    def __init__(self, fleet: ServerFleet, transport: WeightTransport, verify: bool, tied: bool | None, lock: threading.Lock) -> None:
        self.fleet = fleet
        self.transport = transport
        self.verify = verify
        self.tied = tied
        self.lock = lock
        self.last_seconds: float | None = None
        """Wall time of the latest sync (pause → resume, writing the files included)."""

    def label(self, version: int) -> None:
        """Label the weights the servers hold now ``version`` (no transfer)."""
        failures = _failed("label", each(self.fleet.servers, lambda s: self.fleet.label(s, version)))
        if failures:
            raise WeightSyncError(version, failures)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """pause → transfer → verify → label → reset prefix cache → resume (always), on every server.
        The caller holds ``lock``."""
        servers = self.fleet.servers
        start = time.perf_counter()
        failures: dict[str, str] = {}
        paused: list[Server] = []
        rolled_back: list[Server] = []
        trainer_error: Exception | None = None
        pairs = _Drained(named_tensors)
        try:
            try:
                failures.update(_failed("pause", each(servers, self.fleet.pause)))
                paused = [s for s in servers if s.url not in failures]
                if not failures:
                    self._update(pairs, version, paused, failures, rolled_back)
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
                for url, error in each(servers, self.fleet.resume).items():
                    if error is not None:
                        failures[url] = failures.get(url, "updated") + f"; COULD NOT RESUME: {error}"
                self.transport.prune()
                self.last_seconds = time.perf_counter() - start
            finally:
                pairs.drain()  # sharded parameters are gathered collectively: every rank iterates to the end
        for url, error in each(rolled_back, self.fleet.probe).items():
            if error is not None:
                failures[url] += f"; BUT IT DOES NOT SERVE after the rollback, restart it: {error}"
        if failures:
            raise WeightSyncError(version, failures) from trainer_error

    def _update(self, pairs: _Drained, version: int, servers: list[Server], failures: dict[str, str], rolled_back: list[Server]) -> None:
        """Transfer, verify, label and reset the prefix cache of paused servers; a server whose
        transfer or verification failed is rolled back to its last good weights (and added to
        ``rolled_back``)."""
        tensors: Iterable[tuple[str, torch.Tensor]] = list(pairs) if self.verify else pairs
        new_path, errors = self.transport.send(tensors, version)
        checksums: dict[str, dict[str, str]] = {}
        if self.verify:
            sent = dict(tensors)

            def check(server: Server) -> None:
                checksums[server.url] = verify_server(self.fleet, server, sent)

            checks = each([s for s in servers if errors.get(s.url) is None], check)
            errors.update({url: RuntimeError(f"verification after the transfer: {e}") for url, e in checks.items() if e is not None})
        for server in servers:
            if errors.get(server.url) is not None:
                failures[server.url] = f"failed at transfer: {errors[server.url]}; {self._roll_back(server)}"
                logger.warning("weight sync to version %d: %s %s", version, server.url, failures[server.url])
                rolled_back.append(server)
            else:
                server.weights_path, server.checksums = new_path, checksums.get(server.url)
        failures.update(_failed("label", each([s for s in servers if s.url not in failures], lambda s: self.fleet.label(s, version))))
        reset = each(servers, self.fleet.reset_prefix_cache)
        failures.update({url: failures.get(url, "updated") + f"; failed at reset_prefix_cache: {e}" for url, e in reset.items() if e is not None})

    def _roll_back(self, server: Server) -> str:
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
        assert self.lock.locked(), "rollbacks run inside a sync, under the sync lock: two must never interleave"
        reasons = []
        for path, label, expected in attempts:
            # The one retry loop of the engine. Safe after a timeout too: reloading one folder and
            # setting one label are idempotent (a reload still running server-side only runs again).
            # Routes that are not idempotent (pause, resume, generate, the NCCL update steps) are
            # never retried: a timed-out call may still take effect on the server.
            for _ in range(3):
                try:
                    self.fleet.reload(server, path)
                    self.fleet.reload(server, path)  # clean pass: no layer keeps a tensor of the failed attempt
                    if expected is not None and self.fleet.checksums(server) != expected:
                        reasons.append(f"after reloading {path} its checksums differ from those of version {label}")
                        continue
                    if label != server.label:
                        self.fleet.label(server, label)
                except RemoteServerError as err:
                    reasons.append(f"reloading {path}: {err.detail}")
                    continue
                server.weights_path = path if path != server.checkpoint else None
                server.checksums = expected
                if path == server.checkpoint and self.tied is not False:
                    return (
                        f"reloaded its checkpoint {path} (version -1) and resumed, BUT with tied embeddings vLLM's reload "
                        "from a checkpoint folder (it has no lm_head.weight) keeps the LM head it had: restart the server"
                        + ("" if self.tied else " if the model ties its embeddings")
                    )
                return f"rolled back to version {label} ({path}) and resumed"
        return "ROLLBACK FAILED, the server cannot serve until restarted (" + "; ".join(reasons) + ")"
