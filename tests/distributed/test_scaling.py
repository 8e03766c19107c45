"""Scale and fault tolerance: DDP and FSDP2 on 2 CPU processes, exact resume after SIGKILL,
a kill during checkpoint saving, and the non-finite guard, all through the real ``archer fit``.

Runs that need their own process (DDP/FSDP2 launch their workers by re-running the command; a
SIGKILL must not take pytest down) are ``python -m archer.cli`` subprocesses; the others run
in-process with ``archer.cli.main``. Every run is the quickstart config plus a small override
file (steps, checkpoint interval, test callbacks) and, for the multi-process runs, only
``--trainer.strategy`` / ``--trainer.devices`` on the command line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from archer.cli import main
from archer.data import PromptDataModule
from archer.data.tasks import DigitCopyTask

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
RUN = "runs/quickstart"  # the quickstart's relative output folder, under each test's cwd
TRAIN_SIZE = 256
BATCH_SIZE = 16  # the quickstart's global prompts per step
GROUP_SIZE = 8  # the quickstart's sampling.n
FSDP2 = json.dumps(
    {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        # One node, 2 processes: all of them data-parallel (the default would make them tensor-parallel).
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
)


# ------------------------------------------------------------------------------------- helpers
def _checkpoint_callback(every: int) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        # save_top_k=-1 keeps every step's file (the comparisons read step 2 and step 4).
        "init_args": {"dirpath": f"{RUN}/checkpoints", "every_n_train_steps": every, "save_last": True,
                      "save_top_k": -1},
    }


def _override_file(run_dir: Path, *, max_steps: int, every: int, callbacks=(), model: dict | None = None) -> str:
    """A second ``--config``: few steps, no validation, checkpoint every ``every`` steps, test callbacks."""
    config = {
        "trainer": {
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "callbacks": [_checkpoint_callback(every), *callbacks],
        },
        "data": {"train_size": TRAIN_SIZE, "val_size": 0},
    }
    if model:
        config["model"] = model
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _recording_engine(record_dir: Path) -> dict:
    return {"rollout": {"class_path": "scale_probe.RecordingHFEngine",
                        "init_args": {"record_dir": str(record_dir), "seed_by_prompt": True}}}


def _args(model_dir: str, override: str, *extra: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, "--config", override, f"--model.model_path={model_dir}", *extra]


def _subprocess(run_dir: Path, args: list[str], *, env: dict | None = None, timeout: float = 240) -> tuple[int, str]:
    """``python -m archer.cli ARGS`` in ``run_dir`` with this folder importable (for ``scale_probe``);
    returns the exit status and the output's tail.

    The child runs in its own process group. After it ends, every process of the group (its reward
    workers) must be gone within a few seconds, a SIGKILLed trainer included: workers read EOF on
    their pipe when the trainer dies. Output goes to a file, not a pipe, so a lingering process
    could not keep this call waiting.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
    full_env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    log = run_dir / "output.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "archer.cli", *args], cwd=run_dir, env=full_env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            deadline = time.monotonic() + 10
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _group_alive(process.pid), "processes of the trainer outlived it (orphaned reward workers?)"
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return returncode, log.read_text()[-6000:]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _in_process(run_dir: Path, args: list[str], monkeypatch) -> None:
    monkeypatch.chdir(run_dir)
    monkeypatch.syspath_prepend(str(HERE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses: the reward worker needs the other core
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)


def _metrics(run_dir: Path) -> pd.DataFrame:
    files = sorted((run_dir / RUN / "csv").glob("version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    return pd.read_csv(files[-1])


def _train_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.dropna(subset=["train/grad_norm"]).reset_index(drop=True)


def _actor(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("actor.")}


def _records(record_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record_dir / f"rank{rank}.jsonl").read_text().splitlines()]


def _assert_ok(result: tuple[int, str]) -> None:
    returncode, output = result
    assert returncode == 0, f"exit {returncode}\n{output}"


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
    override = _override_file(run_dir, max_steps=STEPS, every=EVERY, model=_recording_engine(run_dir / "records"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _in_process(run_dir, _args(tiny_model_dir, override), monkeypatch)
    return run_dir


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def two_processes(request, tiny_model_dir, tmp_path_factory):
    """2 CPU processes (gloo), EVERY steps; only the strategy and device count differ from ``one_process``."""
    run_dir = tmp_path_factory.mktemp(request.param)
    override = _override_file(run_dir, max_steps=EVERY, every=EVERY, model=_recording_engine(run_dir / "records"))
    strategy = "ddp" if request.param == "ddp" else FSDP2
    result = _subprocess(run_dir, _args(tiny_model_dir, override, f"--trainer.strategy={strategy}",
                                        "--trainer.devices=2"))
    _assert_ok(result)
    return request.param, run_dir


def test_two_processes_train_with_finite_losses_and_log_metrics(two_processes):
    _, run_dir = two_processes
    df = _metrics(run_dir)
    assert not [m for m in REQUIRED_METRICS if m not in df.columns]
    train = _train_rows(df)
    assert len(train) == EVERY
    for column in ("train/pg_loss", "train/grad_norm", "train/reward_mean"):
        assert train[column].map(math.isfinite).all(), train[column]
    assert (train["train/nonfinite_steps"] == 0).all()


def test_each_rank_rolls_out_its_own_whole_groups(two_processes, tiny_model_dir):
    """Rank r's prompts of step k are exactly its half of global batch k (disjoint from the other
    rank's, together the whole batch), and each prompt's n samples come back from that rank's engine."""
    _, run_dir = two_processes
    ranks = [_records(run_dir / "records", r) for r in (0, 1)]
    expected = _global_batches(tiny_model_dir, EVERY)
    half = BATCH_SIZE // 2
    for step in range(EVERY):
        assert ranks[0][step]["prompts"] == expected[step][:half], f"step {step}: rank 0 rolled out other prompts"
        assert ranks[1][step]["prompts"] == expected[step][half:], f"step {step}: rank 1 rolled out other prompts"
        for r in (0, 1):
            assert ranks[r][step]["world_size"] == 2
            assert ranks[r][step]["group_sizes"] == [GROUP_SIZE] * half, "a group was split across ranks"


def test_two_processes_match_one_process(two_processes, one_process):
    """Same global batch, same samples (seeded by prompt, not by rank): the global quantities of
    each step and the weights after 2 steps agree with 1 process.

    Compared: ``grad_norm`` (computed after the gradient all-reduce: global), ``reward_mean``
    (equal-size halves: the rank mean is the global mean) and the actor's weights. ``pg_loss`` is
    logged as the mean of the ranks' local token-means, which is not the global token-mean when
    the halves have different token counts, so it is not compared. Tolerance: float32 sums in a
    different order (2 partial sums + all-reduce vs 1 sum). Measured on 2 CPU processes: grad_norm
    within 2e-7 relative, weights within 1.3e-7 (DDP) and 2.3e-7 (FSDP2); asserted: rtol 1e-5 on
    grad_norm and atol 2e-6 on every weight. A wrong loss scale (e.g. a missing ``× world``) moves
    grad_norm by a factor of 2 and AdamW's ~lr·sign(g) steps by up to 2·lr = 4e-3.
    """
    name, run_dir = two_processes
    one, two = _train_rows(_metrics(one_process))[:EVERY], _train_rows(_metrics(run_dir))
    samples_one = _records(one_process / "records", 0)
    samples_two = [_records(run_dir / "records", r) for r in (0, 1)]
    for step in range(EVERY):  # the precondition of the comparison: the very same samples
        both = samples_two[0][step]["completions"] + samples_two[1][step]["completions"]
        assert samples_one[step]["completions"] == both, f"step {step}: different samples"
    torch.testing.assert_close(torch.tensor(two["train/reward_mean"].values),
                               torch.tensor(one["train/reward_mean"].values), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["train/grad_norm"].values),
                               torch.tensor(one["train/grad_norm"].values), rtol=1e-5, atol=1e-7)
    reference = _actor(one_process / RUN / "checkpoints" / f"epoch=0-step={EVERY}.ckpt")
    if name == "ddp":
        weights = _actor(run_dir / RUN / "checkpoints" / "last.ckpt")
    else:  # FSDP2 saves a sharded (torch.distributed.checkpoint) folder
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(run_dir / RUN / "checkpoints" / "last.ckpt", run_dir / "consolidated.pt")
        state = torch.load(run_dir / "consolidated.pt", weights_only=False)
        weights = {k: v for k, v in state["state_dict"].items() if k.startswith("actor.")}
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=2e-6, msg=key)


# -------------------------------------------------------------------------------- fault tolerance
def test_sigkill_then_resume_reproduces_the_uninterrupted_weights(one_process, tiny_model_dir, tmp_path, monkeypatch):
    """Checkpoint at step 2, SIGKILL after step 3 (its progress is lost), ``--ckpt_path last`` to
    step 4: the final actor weights and AdamW state equal the uninterrupted run's bit for bit."""
    engine = _recording_engine(tmp_path / "records")
    kill = {"class_path": "scale_probe.SigkillAfterStep", "init_args": {"step": KILL_AFTER}}
    override = _override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill], model=engine)
    result = _subprocess(tmp_path, _args(tiny_model_dir, override))
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == EVERY

    resume = _override_file(tmp_path, max_steps=STEPS, every=EVERY, model=engine)
    _in_process(tmp_path, _args(tiny_model_dir, resume, "--ckpt_path=last"), monkeypatch)

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
    override = _override_file(tmp_path, max_steps=STEPS, every=EVERY, callbacks=[kill],
                              model=_recording_engine(tmp_path / "records"))
    result = _subprocess(tmp_path, _args(tiny_model_dir, override))
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"
    # Only the killed write's hidden temp file is left beside the two complete checkpoints.
    names = sorted(p.name for p in checkpoints.iterdir())
    staged = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
    assert len(staged) == 1, names
    assert sorted(set(names) - set(staged)) == [f"epoch=0-step={EVERY}.ckpt", "last.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == EVERY
    straight = _actor(one_process / RUN / "checkpoints" / f"epoch=0-step={EVERY}.ckpt")
    for key, value in straight.items():
        assert torch.equal(state["state_dict"][key], value), key


def test_nan_reward_skips_steps_counts_them_and_stops_with_a_usable_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """From step 1 on the reward returns NaN (for real: NaN advantages -> NaN loss and gradients).
    Each such optimizer step is skipped and counted; the 2nd in a row stops the run with
    FloatingPointError; the step-1 checkpoint loads with finite weights."""
    marker = tmp_path / "reward-is-broken"
    touch = {"class_path": "scale_probe.TouchFileAtStep", "init_args": {"path": str(marker), "step": 1}}
    model = {"reward": {"class_path": "scale_probe.NaNAfterMarkerReward", "init_args": {"marker": str(marker)}},
             "update": {"max_nonfinite_steps": 2}}
    override = _override_file(tmp_path, max_steps=10, every=1, callbacks=[touch], model=model)
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row had a non-finite"):
        _in_process(tmp_path, _args(tiny_model_dir, override), monkeypatch)
    train = _metrics(tmp_path).dropna(subset=["train/nonfinite_steps"]).reset_index(drop=True)
    # 1 good step, then 1 skipped one logged (the 2nd raises before logging); a skipped step logs
    # the NaN reward and gradient norm that caused it.
    assert list(train["train/nonfinite_steps"]) == [0, 1]
    assert math.isfinite(train["train/reward_mean"][0]) and math.isfinite(train["train/grad_norm"][0])
    assert math.isnan(train["train/reward_mean"][1]) and math.isnan(train["train/grad_norm"][1])
    state = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1
    assert all(torch.isfinite(v).all() for k, v in state["state_dict"].items() if k.startswith("actor."))
