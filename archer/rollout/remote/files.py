"""The ``files`` weight transport (CPU, CI, any machine): safetensors in a folder every server reads.

The tensors are written as safetensors files of at most about 1 GiB into a fresh folder
``vNNNNNN`` under this engine's folder ``weights_dir/archer-weights-HOST-PID-ID`` (under a
temporary name, renamed when complete, so a server never reads a half-written folder), then every
server runs ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``.
Each server must be able to read ``weights_dir``: the same machine (``/dev/shm`` by default) or a
shared filesystem.

Tensors whose name or shape differ from the actor's at ``setup`` are refused before any server
reads them: vLLM's in-place reload moves each layer to the meta device until its tensors arrive,
and a tensor it cannot load leaves layers it cannot recover.

Each server keeps the folder it holds (its rollback point); the others are deleted after every
sync, and the engine's whole folder at ``close``, garbage collection or exit. Folders left behind
by engines of this machine whose process died are deleted when the next engine starts
(:func:`sweep_stale_weight_dirs`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from archer.rollout.remote.client import RemoteServerError
from archer.rollout.remote.fleet import Server, ServerFleet, each
from archer.rollout.server import pid_alive

__all__ = ["FilesTransport", "make_run_dir", "sweep_stale_weight_dirs", "write_safetensors"]

logger = logging.getLogger(__name__)

_SHARD_BYTES = 1 << 30
"""Largest safetensors file the ``files`` transport writes (bounds the extra host memory)."""
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


def make_run_dir(weights_dir: str | None) -> Path:
    """A new folder for one engine's weights under ``weights_dir`` (None: ``/dev/shm`` if writable,
    else the temporary folder), after sweeping the stale folders there."""
    root = weights_dir
    if root is None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    sweep_stale_weight_dirs(Path(root))
    path = Path(root) / f"{_RUN_DIR_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


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


class FilesTransport:
    """Weights through a folder (see the module docstring).

    Args:
        fleet: The servers.
        run_dir: This engine's folder (:func:`make_run_dir`); deleted by :meth:`close`, garbage
            collection or exit.
        shapes: Name → shape every sync must match (the actor's at ``setup``); None: the first
            successful sync's names and shapes become the reference.
    """

    def __init__(self, fleet: ServerFleet, run_dir: Path, shapes: dict[str, tuple[int, ...]] | None) -> None:
        self.fleet = fleet
        self.run_dir = run_dir
        self.shapes = shapes
        self._remove = weakref.finalize(self, shutil.rmtree, run_dir, ignore_errors=True)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> tuple[str | None, dict[str, BaseException | None]]:
        """Write the tensors into a new folder, then have every server reload it. Returns the folder
        and url → error."""
        dtypes = {s.dtype for s in self.fleet.servers}
        dtype = dtypes.pop() if len(dtypes) == 1 else None  # one cast for all; vLLM casts anyway
        final = self.run_dir / f"v{version:06d}"
        partial = self.run_dir / f".v{version:06d}.partial-{uuid.uuid4().hex[:8]}"
        try:
            written = write_safetensors(named_tensors, partial, dtype, self.shapes)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # atomic: a server never sees a half-written folder
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"writing the weights to {partial} failed: {type(err).__name__}: {err}") from err

        def reload(server: Server) -> None:
            try:
                self.fleet.reload(server, str(final))
            except RemoteServerError as err:
                raise RemoteServerError(
                    server.url, f"reload_weights from {final} failed ({err.detail}). The folder must be readable by the "
                    "server: the same machine, or weights_dir on a shared filesystem", status=err.status,
                ) from err  # fmt: skip

        errors = each(self.fleet.servers, reload)
        if self.shapes is None and not any(errors.values()):
            self.shapes = written
        return str(final), errors

    def prune(self) -> None:
        """Delete weight folders no server holds any more (each server's current one is its rollback)."""
        keep = {Path(s.weights_path).name for s in self.fleet.servers if s.weights_path}
        for path in self.run_dir.iterdir():
            if path.name not in keep and not path.name.startswith(".v"):
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Delete this engine's folder; idempotent."""
        self._remove()
