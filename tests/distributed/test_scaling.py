"""Scale and fault tolerance on the quickstart: DDP and FSDP2 on 2 CPU processes, exact resume
after SIGKILL and a kill during checkpoint saving, all through the real ``archer fit`` (run by
``harness``; the paper's update knobs and the non-finite guard are in ``test_paper_tier.py``).
"""

from __future__ import annotations

import math
import signal

import pytest
import torch
from harness import (
    FSDP2,
    RUN,
    actor_weights,
    args,
    assert_ok,
    in_process,
    metrics,
    override_file,
    recording_engine,
    records,
    run_subprocess,
    train_rows,
)

from archer.data import PromptDataModule
from archer.data.tasks import DigitCopyTask

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN_SIZE = 256  # the harness's data.train_size
BATCH_SIZE = 16  # the quickstart's global prompts per step
GROUP_SIZE = 8  # the quickstart's sampling.n


def _global_batches(model_dir: str, num: int) -> list[list[list[int]]]:
    """Prompt token ids of the first ``num`` global batches of the quickstart's train stream."""
    data = PromptDataModule(model_dir, task=DigitCopyTask(), train_size=TRAIN_SIZE, batch_size=BATCH_SIZE)
    data.setup()
    stream = data.stream
    return [[data.train_items[i]["prompt_ids"] for i in stream.global_batch_indices(k)] for k in range(num)]


REQUIRED_METRICS = ["train/reward_mean", "train/pg_loss", "train/grad_norm", "train/lr", "train/nonfinite_steps",
                    "perf/tokens_per_s"]
# The 1-process reference runs STEPS with a checkpoint every EVERY steps; the 2-process runs stop
# at EVERY and are compared with its step-EVERY checkpoint; the killed runs resume to STEPS.
STEPS, EVERY, KILL_AFTER = 4, 2, 3


# ------------------------------------------------------------------------------ multi-process
@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: 1 process, uninterrupted, groups sampled with prompt-derived seeds."""
    run_dir = tmp_path_factory.mktemp("one")
    override = override_file(run_dir, max_steps=STEPS, every=EVERY, model=recording_engine(run_dir / "records"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
    return run_dir


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def two_processes(request, tiny_model_dir, tmp_path_factory):
    """2 CPU processes (gloo), EVERY steps; only the strategy and device count differ from ``one_process``."""
    run_dir = tmp_path_factory.mktemp(request.param)
    override = override_file(run_dir, max_steps=EVERY, every=EVERY, model=recording_engine(run_dir / "records"))
    strategy = "ddp" if request.param == "ddp" else FSDP2
    result = run_subprocess(run_dir, args(tiny_model_dir, override, f"--trainer.strategy={strategy}",
                                        "--trainer.devices=2"))
    assert_ok(result)
    return request.param, run_dir


def test_two_processes_train_with_finite_losses_and_logmetrics(two_processes):
    _, run_dir = two_processes
    df = metrics(run_dir)
    assert not [m for m in REQUIRED_METRICS if m not in df.columns]
    train = train_rows(df)
    assert len(train) == EVERY
    for column in ("train/pg_loss", "train/grad_norm", "train/reward_mean"):
        assert train[column].map(math.isfinite).all(), train[column]
    assert (train["train/nonfinite_steps"] == 0).all()


def test_each_rank_rolls_out_its_own_whole_groups(two_processes, tiny_model_dir):
    """Rank r's prompts of step k are exactly its share of global batch k (items r, r + 2, ...: disjoint
    from the other rank's, together the whole batch), and each prompt's n samples come back from that
    rank's engine."""
    _, run_dir = two_processes
    ranks = [records(run_dir / "records", r) for r in (0, 1)]
    expected = _global_batches(tiny_model_dir, EVERY)
    half = BATCH_SIZE // 2
    for step in range(EVERY):
        assert ranks[0][step]["prompts"] == expected[step][0::2], f"step {step}: rank 0 rolled out other prompts"
        assert ranks[1][step]["prompts"] == expected[step][1::2], f"step {step}: rank 1 rolled out other prompts"
        for r in (0, 1):
            assert ranks[r][step]["world_size"] == 2
            assert ranks[r][step]["group_sizes"] == [GROUP_SIZE] * half, "a group was split across ranks"


def test_two_processes_match_one_process(two_processes, one_process):
    """Same global batch, same samples (seeded by prompt, not by rank): the global quantities of
    each step and the weights after 2 steps agree with 1 process.

    Compared: ``grad_norm`` (computed after the gradient all-reduce: global), ``reward_mean`` and
    ``pg_loss`` (statistics are summed over ranks as numerator and denominator, so they are the
    global values) and the actor's weights. Tolerance: float32 sums in a different order (2 partial
    sums + all-reduce vs 1 sum). Measured on 2 CPU processes: grad_norm within 2e-7 relative, weights
    within 1.3e-7 (DDP) and 2.3e-7 (FSDP2); asserted: rtol 1e-5 on grad_norm and pg_loss and atol
    2e-6 on every weight. A wrong loss scale (e.g. a missing ``× world``) moves grad_norm by a
    factor of 2 and AdamW's ~lr·sign(g) steps by up to 2·lr = 4e-3.
    """
    _, run_dir = two_processes
    one, two = train_rows(metrics(one_process))[:EVERY], train_rows(metrics(run_dir))
    samples_one = records(one_process / "records", 0)
    samples_two = [records(run_dir / "records", r) for r in (0, 1)]
    for step in range(EVERY):  # the precondition of the comparison: the very same samples
        assert samples_one[step]["completions"][0::2] == samples_two[0][step]["completions"], f"step {step}"
        assert samples_one[step]["completions"][1::2] == samples_two[1][step]["completions"], f"step {step}"
    torch.testing.assert_close(torch.tensor(two["train/reward_mean"].values),
                               torch.tensor(one["train/reward_mean"].values), rtol=0, atol=1e-6)
    for column in ("train/grad_norm", "train/pg_loss"):
        torch.testing.assert_close(torch.tensor(two[column].values), torch.tensor(one[column].values),
                                   rtol=1e-5, atol=1e-7, msg=column)
    reference = actor_weights(one_process / RUN / "checkpoints" / f"epoch=0-step={EVERY}.ckpt")
    weights = actor_weights(run_dir / RUN / "checkpoints" / "last.ckpt")  # FSDP2: a sharded folder
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=2e-6, msg=key)


# -------------------------------------------------------------------------------- fault tolerance
def test_sigkill_then_resume_reproduces_the_uninterrupted_weights(one_process, tiny_model_dir, tmp_path, monkeypatch):
    """Checkpoint at step 2, SIGKILL after step 3 (its progress is lost), ``--ckpt_path last`` to
    step 4: the final actor weights and AdamW state equal the uninterrupted run's bit for bit."""
    engine = recording_engine(tmp_path / "records")
    kill = {"class_path": "scale_probe.SigkillAfterStep", "init_args": {"step": KILL_AFTER}}
    override = override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill], model=engine)
    result = run_subprocess(tmp_path, args(tiny_model_dir, override))
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == EVERY

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


def test_sigkill_while_saving_leaves_the_previous_checkpoint_whole(one_process, tiny_model_dir, tmp_path):
    """SIGKILL in the middle of writing step 4's checkpoint: ``last.ckpt`` is still step 2's, loads
    and holds exactly the uninterrupted run's step-2 weights; no partial step-4 file exists.

    ``AtomicCheckpointIO`` (the quickstart's checkpoint plugin) stages the bytes in a hidden temp
    file next to the target and renames it into place once they are all on disk.
    """
    checkpoints = tmp_path / RUN / "checkpoints"
    kill = {"class_path": "scale_probe.SigkillWhileSaving", "init_args": {"step": STEPS, "watch_dir": str(checkpoints)}}
    override = override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill],
                              model=recording_engine(tmp_path / "records"))
    result = run_subprocess(tmp_path, args(tiny_model_dir, override))
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"
    # Only the killed write's hidden temp file is left beside the two complete checkpoints.
    names = sorted(p.name for p in checkpoints.iterdir())
    staged = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
    assert len(staged) == 1, names
    assert sorted(set(names) - set(staged)) == [f"epoch=0-step={EVERY}.ckpt", "last.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == EVERY
    straight = actor_weights(one_process / RUN / "checkpoints" / f"epoch=0-step={EVERY}.ckpt")
    for key, value in straight.items():
        assert torch.equal(state["state_dict"][key], value), key
