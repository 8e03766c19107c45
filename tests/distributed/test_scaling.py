"""Fault tolerance on the quickstart: exact resume after SIGKILL and a kill during checkpoint saving,
through the real ``archer fit`` (run by ``harness``). DDP and FSDP2 on 2 CPU processes, against 1
process, are in ``test_paper_tier.py`` (with the paper's update knobs, a superset of the quickstart's).
"""

from __future__ import annotations

import signal

import pytest
import torch
from harness import RUN, actor_weights, args, in_process, override_file, recording_engine, run_subprocess

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# The 1-process reference runs STEPS with a checkpoint every EVERY steps; the killed run resumes to STEPS.
STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: 1 process, uninterrupted, groups sampled with prompt-derived seeds."""
    run_dir = tmp_path_factory.mktemp("one")
    override = override_file(run_dir, max_steps=STEPS, every=EVERY, model=recording_engine(run_dir / "records"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
    return run_dir


def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_reproduces_the_uninterrupted_run(
    one_process, tiny_model_dir, tmp_path, monkeypatch
):
    """SIGKILL in the middle of writing step 4's checkpoint (steps 3 and 4 are lost): ``last.ckpt`` is
    still step 2's, whole, with exactly the uninterrupted run's step-2 weights, and no partial step-4
    file exists. Then ``--ckpt_path last`` to step 4: the actor weights and AdamW state equal the
    uninterrupted run's bit for bit.

    ``AtomicCheckpointIO`` (the quickstart's checkpoint plugin) stages the bytes in a hidden temp
    file next to the target and renames it into place once they are all on disk.
    """
    checkpoints = tmp_path / RUN / "checkpoints"
    engine = recording_engine(tmp_path / "records")
    kill = {"class_path": "scale_probe.SigkillWhileSaving", "init_args": {"step": STEPS, "watch_dir": str(checkpoints)}}
    override = override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill], model=engine)
    result = run_subprocess(tmp_path, args(tiny_model_dir, override))
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"
    # Only the killed write's hidden temp file is left beside the two complete checkpoints.
    names = sorted(p.name for p in checkpoints.iterdir())
    staged = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
    assert len(staged) == 1, names
    assert sorted(set(names) - set(staged)) == [f"epoch=0-step={EVERY}.ckpt", "last.ckpt"]
    last = checkpoints / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == EVERY
    straight = actor_weights(one_process / RUN / "checkpoints" / f"epoch=0-step={EVERY}.ckpt")
    for key, value in straight.items():
        assert torch.equal(state["state_dict"][key], value), key

    resume = override_file(tmp_path, max_steps=STEPS, every=EVERY, model=engine)
    in_process(tmp_path, args(tiny_model_dir, resume, "--ckpt_path=last"), monkeypatch)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    straight = torch.load(one_process / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == STEPS
    actor = [k for k in straight["state_dict"] if k.startswith("actor.")]
    assert actor
    for key in actor:
        assert torch.equal(resumed["state_dict"][key], straight["state_dict"][key]), key
    moments = zip(resumed["optimizer_states"][0]["state"].values(), straight["optimizer_states"][0]["state"].values())
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
