"""Running ``archer fit`` from tests: override files, in-process and subprocess runs, reading results.

Every run is a shipped config (the quickstart by default) plus a small override file (steps,
checkpoint interval, test components) and, for multi-process runs, ``--trainer.strategy`` /
``--trainer.devices`` on the command line. Runs that need their own process (DDP/FSDP2 launch their
workers by re-running the command; a SIGKILL must not take pytest down) are ``python -m archer.cli``
subprocesses; the others run in-process with ``archer.cli.main``. This folder is put on
``PYTHONPATH`` so that child processes import the test components of ``scale_probe``.
"""

from __future__ import annotations

import json
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
RUN = "runs/quickstart"  # the quickstart's relative output folder, under each test's cwd
FSDP2 = json.dumps(
    {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        # One node, 2 processes: all of them data-parallel (the default would make them tensor-parallel).
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
)


def checkpoint_callback(every: int) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        # save_top_k=-1 keeps every step's file (comparisons read intermediate steps).
        "init_args": {"dirpath": f"{RUN}/checkpoints", "every_n_train_steps": every, "save_last": True,
                      "save_top_k": -1},
    }


def override_file(
    run_dir: Path, *, max_steps: int, every: int, callbacks=(), model: dict | None = None, data: dict | None = None,
    name: str = "override.yaml",
) -> str:
    """A second ``--config``: few steps, no validation, checkpoint every ``every`` steps, test callbacks."""
    config = {
        "trainer": {
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "callbacks": [checkpoint_callback(every), *callbacks],
        },
        "data": {"train_size": 256, "val_size": 0, **(data or {})},
    }
    if model:
        config["model"] = model
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def recording_engine(record_dir: Path) -> dict:
    """``model.rollout`` for an engine that records each rank's rollouts and seeds each group by its prompt."""
    return {"rollout": {"class_path": "scale_probe.RecordingHFEngine",
                        "init_args": {"record_dir": str(record_dir), "seed_by_prompt": True}}}


def args(model_dir: str, override: str, *extra: str, config: str = QUICKSTART) -> list[str]:
    return ["fit", "--config", config, "--config", override, f"--model.model_path={model_dir}", *extra]


def run_subprocess(run_dir: Path, argv: list[str], *, env: dict | None = None, timeout: float = 240) -> tuple[int, str]:
    """``python -m archer.cli ARGV`` in ``run_dir`` with this folder importable (for ``scale_probe``);
    returns the exit status and the output's tail.

    The child runs in its own process group. After it ends, every process of the group (its reward
    workers) must be gone within a few seconds, a SIGKILLed trainer included: workers read EOF on
    their pipe when the trainer dies. Output goes to a file, not a pipe, so a lingering process
    could not keep this call waiting. A child still running at ``timeout`` (a deadlock) is killed
    and the test fails.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
    full_env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    log = run_dir / "output.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "archer.cli", *argv], cwd=run_dir, env=full_env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"archer {' '.join(argv)} still running after {timeout} s (deadlock?)\n{log.read_text()[-4000:]}")
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


def in_process(run_dir: Path, argv: list[str], monkeypatch) -> None:
    monkeypatch.chdir(run_dir)
    monkeypatch.syspath_prepend(str(HERE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses: the reward worker needs the other core
    try:
        main(argv)
    finally:
        torch.set_num_threads(threads)


def metrics(run_dir: Path, run: str = RUN) -> pd.DataFrame:
    files = sorted((run_dir / run / "csv").glob("version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    return pd.read_csv(files[-1])


def train_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.dropna(subset=["train/reward_mean"]).reset_index(drop=True)


def actor_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The actor's weights of a checkpoint: one file, or an FSDP2 (torch.distributed.checkpoint) folder."""
    from archer.export import load_checkpoint

    state = load_checkpoint(checkpoint)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("actor.")}


def records(record_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record_dir / f"rank{rank}.jsonl").read_text().splitlines()]


def assert_ok(result: tuple[int, str]) -> None:
    returncode, output = result
    assert returncode == 0, f"exit {returncode}\n{output}"
