"""Checkpoint files that are either the old one or the complete new one, never a torn write.

Lightning's default writer serialises into memory and then moves a temp file from ``TMPDIR`` into
place; when ``TMPDIR`` is on another file system (node-local ``/tmp``, checkpoints on NFS/Lustre)
that move is a copy a kill can cut short, and nothing is fsync'ed. :class:`AtomicCheckpointIO`
stages the file next to its target, fsyncs it, renames it over the target (atomic on POSIX within
one file system) and fsyncs the folder so the rename survives a node crash.

Use it with ``trainer.plugins: [{class_path: archer.checkpoint_io.AtomicCheckpointIO}]``. It covers
single-file checkpoints (single device, DDP, FSDP2 with ``save_distributed_checkpoint: false``). A
write that fails (a full disk) removes its temp file and raises :class:`CheckpointWriteError`, which
says that the previous checkpoint is untouched.

FSDP2's sharded folders are written by ``torch.distributed.checkpoint`` (every rank its shards) in
place, where a kill midway leaves a folder of new and old shards. :func:`guard_checkpoints` (which
``ArcherModule`` applies to every strategy) makes the strategy write such a folder under a hidden
name beside its target (``.last.ckpt.partial``), then swap it in with one atomic rename
(``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, with the old folder kept until the
new one is in place). It also times each save as the watchdog's ``checkpoint`` phase, and checks
that a checkpoint can be read before a resume loads it (:func:`check_readable`): a truncated or
corrupt file stops the run with one line naming it (:class:`CorruptCheckpointError`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from archer.watchdog import Watchdog

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "CorruptCheckpointError", "check_readable",
           "guard_checkpoints"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous one is untouched."""


class CorruptCheckpointError(OSError):
    """A checkpoint cannot be read: truncated, corrupt, or a folder with missing shards."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is write-temp, fsync, rename, fsync-folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        out = None
        try:
            with os.fdopen(fd, "wb") as file:
                out = _WriteErrors(file)
                torch.save(checkpoint, out)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staged, target)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            cause = err if isinstance(err, OSError) else getattr(out, "error", None)
            if cause is not None:  # torch.save reports a failed write as a RuntimeError without its errno
                raise CheckpointWriteError(_write_failed(target, cause)) from err
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


class _WriteErrors:
    """A binary file whose first failed write or flush (its ``OSError``) is kept in ``error``."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        return self._call(self.file.write, data)

    def flush(self) -> None:
        self._call(self.file.flush)

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except OSError as err:
            self.error = self.error or err
            raise


def _write_failed(target: Path, err: BaseException) -> str:
    reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
    return (f"writing the checkpoint {target} failed ({reason}); the checkpoints already in {target.parent} are "
            "untouched (a new one is written beside them and renamed into place only when complete): free space, "
            "then resume with --ckpt_path last")


# ---------------------------------------------------------------------------- any strategy

def guard_checkpoints(strategy: Any, watchdog: Watchdog) -> None:
    """Make ``strategy`` (a Lightning strategy) time each save as the watchdog's ``checkpoint`` phase,
    write FSDP2's sharded folders atomically, and check a checkpoint before loading it (module
    docstring). Idempotent."""
    if getattr(strategy, "_archer_guarded", False):
        return
    save, load = strategy.save_checkpoint, strategy.load_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        with watchdog.phase("checkpoint", f"the checkpoint {filepath}"):
            if getattr(strategy, "_save_distributed_checkpoint", False):  # ModelParallelStrategy's folders
                _save_folder(strategy, save, checkpoint, Path(strategy.broadcast(str(filepath))))
            else:
                save(checkpoint, filepath, storage_options)

    def load_checkpoint(checkpoint_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        check_readable(Path(checkpoint_path))
        return load(checkpoint_path, *args, **kwargs)

    strategy.save_checkpoint, strategy.load_checkpoint = save_checkpoint, load_checkpoint
    strategy._archer_guarded = True


def _save_folder(strategy: Any, save: Any, checkpoint: dict[str, Any], target: Path) -> None:
    """Every rank writes its shards into ``.NAME.partial`` beside ``target``; rank 0 then swaps it in."""
    staging = target.with_name(f".{target.name}.partial")
    if strategy.global_rank == 0 and staging.exists():  # left by a save that was killed
        shutil.rmtree(staging)
    strategy.barrier("archer-checkpoint-staging")
    try:
        save(checkpoint, staging)
    except Exception as err:
        if strategy.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) or "No space left" in str(err):  # DCP gathers the ranks' OSErrors in one
            raise CheckpointWriteError(_write_failed(target, err)) from err
        raise
    strategy.barrier("archer-checkpoint-written")
    if strategy.global_rank == 0:
        _swap_in(staging, target)
    strategy.barrier("archer-checkpoint-renamed")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_in(staging: Path, target: Path) -> None:
    """Put the folder ``staging`` at ``target`` in one atomic step when the system allows it, and
    delete what was there."""
    if target.is_file():
        target.unlink()
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):  # staging now holds the old folder
        shutil.rmtree(staging)
    else:  # two renames: the old folder stays whole under another name until the new one is in place
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _exchange(a: Path, b: Path) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)`` (Linux ≥ 3.15, glibc ≥ 2.28); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(a))


def check_readable(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` (and the bad part) unless every byte of
    the checkpoint can be read: a file's zip directory and CRCs (``torch.save``'s format), or for a
    ``torch.distributed.checkpoint`` folder its metadata, every shard file it names, long enough,
    and Lightning's ``meta.pt``. A missing path is left to the loader's own error."""
    if not path.exists():
        return
    if path.is_file():
        _check_zip(path, path)
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to read it is the folder's fault
        raise CorruptCheckpointError(_unreadable(path, path / ".metadata", err)) from err
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sorted(sizes.items()):
        shard = path / name
        size = shard.stat().st_size if shard.is_file() else -1
        if size < needed:
            found = "missing" if size < 0 else f"{size} bytes, {needed} expected"
            raise CorruptCheckpointError(_unreadable(path, shard, f"{found}: truncated or incomplete"))
    for meta in path.glob("meta.pt"):
        _check_zip(path, meta)


def _check_zip(checkpoint: Path, file: Path) -> None:
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(_unreadable(checkpoint, file, err)) from err
    if bad is not None:
        raise CorruptCheckpointError(_unreadable(checkpoint, file, f"the record {bad} fails its CRC check"))


def _unreadable(checkpoint: Path, file: Path, why: object) -> str:
    where = "" if file == checkpoint else f" ({file.name})"
    others = sorted(p.name for p in checkpoint.parent.glob("*.ckpt") if p != checkpoint)
    hint = f"resume from another one ({', '.join(others[:4])}) with --ckpt_path PATH" if others else "start again"
    return f"the checkpoint {checkpoint}{where} cannot be read ({why}): it is truncated or corrupt; {hint}"
