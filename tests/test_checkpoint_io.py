import threading

import pytest
import torch

from archer.checkpoint_io import AtomicCheckpointIO


def test_save_writes_a_loadable_file_and_leaves_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(4.0), "step": 3}, target)
    loaded = io.load_checkpoint(target)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_failed_save_keeps_the_previous_checkpoint_whole(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000), "step": 1}, target)
    # A lock cannot be pickled: torch.save fails after it has started writing the archive.
    with pytest.raises(TypeError):
        io.save_checkpoint({"w": torch.zeros(1000), "lock": threading.Lock()}, target)
    loaded = io.load_checkpoint(target)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_next_save_removes_temp_files_left_by_a_killed_write(tmp_path):
    io = AtomicCheckpointIO()
    (tmp_path / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.ckpt.k1ll3d.tmp").write_bytes(b"another file's, kept")
    io.save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.k1ll3d.tmp", "last.ckpt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_folder_is_swapped_in_whole_and_the_old_one_removed(exchange, tmp_path, monkeypatch):
    """FSDP2's folders: the new one replaces the old in one ``renameat2(RENAME_EXCHANGE)``, or where the
    file system cannot exchange, in two renames; either way nothing else is left."""
    import archer.checkpoint_io as checkpoint_io

    if not exchange:
        monkeypatch.setattr(checkpoint_io, "_exchange", lambda a, b: False)
    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "shard").write_text(text)
    checkpoint_io._swap_in(staging, target)
    assert (target / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    staging.mkdir()  # first save under a name: a plain rename
    (staging / "shard").write_text("newer")
    checkpoint_io._swap_in(staging, tmp_path / "other.ckpt")
    assert (tmp_path / "other.ckpt" / "shard").read_text() == "newer"


def test_a_sharded_folder_with_a_short_or_missing_shard_is_named(tmp_path):
    """A ``torch.distributed.checkpoint`` folder (written here by one process): every file its metadata
    names must be there, at least as long as the records it holds."""
    import torch.distributed.checkpoint as dcp

    from archer.checkpoint_io import CorruptCheckpointError, check_readable

    folder = tmp_path / "last.ckpt"
    dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(folder))
    check_readable(folder)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=rf"the checkpoint {folder} \({shard.name}\) cannot be read "
                                                     r"\(100 bytes, \d+ expected: truncated or incomplete\)"):
        check_readable(folder)
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"\({shard.name}\) cannot be read \(missing"):
        check_readable(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"\(.metadata\) cannot be read"):
        check_readable(folder)
