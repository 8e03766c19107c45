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
