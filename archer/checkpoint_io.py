"""Checkpoint files that are either the old one or the complete new one, never a torn write.

Lightning's default writer serialises into memory and then moves a temp file from ``TMPDIR`` into
place; when ``TMPDIR`` is on another file system (node-local ``/tmp``, checkpoints on NFS/Lustre)
that move is a copy a kill can cut short, and nothing is fsync'ed. :class:`AtomicCheckpointIO`
stages the file next to its target, fsyncs it, renames it over the target (atomic on POSIX within
one file system) and fsyncs the folder so the rename survives a node crash.

Use it with ``trainer.plugins: [{class_path: archer.checkpoint_io.AtomicCheckpointIO}]``. It covers
single-file checkpoints (single device, DDP, FSDP2 with ``save_distributed_checkpoint: false``);
FSDP2's sharded folders are written by ``torch.distributed.checkpoint`` and do not go through it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is write-temp, fsync, rename, fsync-folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staged, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise
        # A process killed mid-write leaves its temp file behind; the next save of the name clears it.
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
