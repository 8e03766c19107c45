"""Faults around checkpoints, on real ``archer fit`` runs of the quickstart (tiny model, CPU):

* fault 8: SIGTERM (preemption) — the step finishes, ``last.ckpt`` is written, exit 143, and the
  resumed run ends with the uninterrupted run's weights and optimizer state, bit for bit;
* fault 7: a truncated or corrupt checkpoint at resume — one line naming the file;
* fault 5: the disk fills during a save (a small tmpfs) — the previous checkpoints stay whole and
  loadable, and the one-line error says so;
* fault 4: SIGKILL while FSDP2's ``last.ckpt`` folder is written (2 ranks) — the folder is the
  previous save's, whole (written aside and renamed into place).
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest
import torch
from fault_probe import CHILD_ENV, report_detection
from harness import FSDP2, RUN, actor_weights, args, assert_ok, in_process, override_file, recording_engine, run_subprocess

from archer.checkpoint_io import check_readable
from archer.preemption import EXIT_CODE
from archer.report import load_metrics, metric_series

pytestmark = [pytest.mark.slow]

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted reference: 4 steps, a checkpoint every 2, groups seeded by their prompt. A fresh
    process, as the interrupted and the resumed runs: bit-for-bit comparisons must not depend on what
    earlier tests left in the test process (after an in-process vLLM run, the last bit of a float32
    gradient norm was seen to differ at the 4th step)."""
    run_dir = tmp_path_factory.mktemp("straight")
    override = override_file(run_dir, max_steps=STEPS, every=EVERY, model=recording_engine(run_dir / "records"))
    assert_ok(run_subprocess(run_dir, args(tiny_model_dir, override), env=CHILD_ENV))
    return run_dir


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(straight, tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM at the start of step 2 (index; the checkpoint interval is 2): the step finishes,
    ``last.ckpt`` holds step 3 — not step 2, the interval's — the run exits 143; resumed to step 4, its
    actor weights and AdamW moments equal the uninterrupted run's."""
    engine = recording_engine(tmp_path / "records")
    term = {"class_path": "fault_probe.SigtermAtStep", "init_args": {"step": 2}}
    override = override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[term], model=engine)
    # Rows every 2 steps: the preempted step (index 2) is not one of them, and still gets its row.
    code, output = run_subprocess(tmp_path, args(tiny_model_dir, override, "--trainer.log_every_n_steps=2"), env=CHILD_ENV)
    report_detection(tmp_path / "output.log", "fault: SIGTERM")
    assert code == EXIT_CODE, output
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert f"archer: SIGTERM received: stopped after step 3 and saved {last}" in output
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3

    resume = override_file(tmp_path, max_steps=STEPS, every=EVERY, model=engine)
    assert_ok(run_subprocess(tmp_path, args(tiny_model_dir, resume, "--ckpt_path=last"), env=CHILD_ENV))
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    reference = torch.load(straight / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == reference["global_step"] == STEPS
    actor = [key for key in reference["state_dict"] if key.startswith("actor.")]
    assert actor and all(torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in actor)
    moments = zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values())
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # Rows: step 1 (log_every_n_steps), step 2 (preempted: written before the exit), step 3 (resumed run).
    rewards = metric_series(load_metrics(str(tmp_path / RUN)), "train/reward_mean")
    assert rewards.index.tolist() == [1, 2, 3]
    straight_rewards = metric_series(load_metrics(str(straight / RUN)), "train/reward_mean")
    assert rewards.tolist() == straight_rewards.loc[[1, 2, 3]].tolist()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_checkpoint_at_resume_is_one_line_naming_the_file(damage, straight, tiny_model_dir, tmp_path, monkeypatch):
    """``last.ckpt`` cut in half (a copy that did not finish), or 64 bytes overwritten in its data (bit
    rot: only the zip's CRC shows it): ``--ckpt_path last`` stops with one line that names the file
    and the other checkpoints to resume from, before anything is loaded."""
    shutil.copytree(straight / RUN, tmp_path / RUN)
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    last.write_bytes(bytes(data))
    override = override_file(tmp_path, max_steps=STEPS + 1, every=EVERY)
    with pytest.raises(SystemExit) as error:
        in_process(tmp_path, args(tiny_model_dir, override, "--ckpt_path=last"), monkeypatch)
    message = str(error.value)
    assert "\n" not in message and f"the checkpoint {last.resolve()} cannot be read" in message, message
    assert "truncated or corrupt; resume from another one (epoch=0-step=2.ckpt, epoch=0-step=4.ckpt)" in message


def _mount_tmpfs(folder, size: str) -> None:
    folder.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def test_a_full_disk_keeps_the_previous_checkpoints_whole_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    """The checkpoint folder is a 10 MiB tmpfs: step 2's two files (4.1 MiB each) fit, step 4's first
    file does not. The run stops with one line naming the file and the cause, the step-2 files are
    whole (every CRC checks) and no temp file is left."""
    checkpoints = tmp_path / RUN / "checkpoints"
    _mount_tmpfs(checkpoints, "10m")
    try:
        override = override_file(tmp_path, max_steps=STEPS, every=EVERY)
        with pytest.raises(SystemExit) as error:
            in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
        message = str(error.value)
        assert "\n" not in message, message
        assert f"writing the checkpoint {checkpoints}/epoch=0-step=4.ckpt failed (No space left on device); the " \
               f"checkpoints already in {checkpoints} are untouched" in message
        assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
        for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
            check_readable(checkpoints / name)
            assert torch.load(checkpoints / name, map_location="cpu", weights_only=False)["global_step"] == 2
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)


@pytest.mark.distributed
def test_sigkill_while_fsdp2_writes_last_keeps_the_previous_folder_whole(tiny_model_dir, tmp_path):
    """Two FSDP2 ranks; both are SIGKILLed (a node failure) while ``last.ckpt`` of step 4 is being
    written — after every shard, during Lightning's ``meta.pt``. Written in place, ``last.ckpt`` would
    now hold step 4's shards under step 2's (truncated) ``meta.pt``; written aside and renamed, it is
    step 2's folder, whole, with step 2's weights."""
    checkpoints = tmp_path / RUN / "checkpoints"
    kill = {"class_path": "fault_probe.SigkillWhileWritingLast", "init_args": {"step": STEPS, "watch_dir": str(checkpoints)}}
    override = override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill])
    code, output = run_subprocess(tmp_path, args(tiny_model_dir, override, f"--trainer.strategy={FSDP2}",
                                                 "--trainer.devices=2"), env=CHILD_ENV, timeout=300)
    assert code == -signal.SIGKILL, output
    last = checkpoints / "last.ckpt"
    check_readable(last)
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == EVERY
    saved, at_two = actor_weights(last), actor_weights(checkpoints / f"epoch=0-step={EVERY}.ckpt")
    assert saved.keys() == at_two.keys() and all(torch.equal(saved[k], at_two[k]) for k in saved)
