"""The ``on_rollout_end`` hook (issue 21, item 6): what a callback sees of each step's rollout, checked
against the task's own reward and GRPO's formula in float64; ``CompletionLogger``'s JSONL file and
its tables in TensorBoard (read back from the event file) and W&B (offline run folder) (item 7)."""

import json
import math
from pathlib import Path

import lightning as L
import pytest

from archer.cli import main
from archer.data.tasks import DigitCopyTask

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--data.train_size=32", "--data.val_size=0", "--trainer.max_steps=2"]


class RolloutRecorder(L.Callback):
    """Keeps every RolloutView it is given (class-level: jsonargparse builds the instance)."""

    views: list = []

    def on_rollout_end(self, trainer, pl_module, rollout) -> None:
        RolloutRecorder.views.append(rollout)


def _fit(model_dir: str, *args: str) -> None:
    main(["fit", "--config", QUICKSTART, f"--model.model_path={model_dir}", *SMALL, *args])


def _grpo(rewards: list[float]) -> list[float]:
    """GRPO's advantage of one group, in float64: (r − mean) / (unbiased std + 1e-6); 0 if all equal."""
    mean = sum(rewards) / len(rewards)
    if max(rewards) == min(rewards):
        return [0.0] * len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


def test_callbacks_see_each_steps_prompts_completions_rewards_and_advantages(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    RolloutRecorder.views = []
    # every_n_steps=1 goes to the quickstart's last callback, CompletionLogger; then the recorder is appended.
    _fit(tiny_model_dir, "--trainer.callbacks.init_args.every_n_steps=1",
         "--trainer.callbacks+=test_rollout_hook.RolloutRecorder")
    views = RolloutRecorder.views
    assert [view.step for view in views] == [0, 1]
    task = DigitCopyTask()
    for view in views:
        n = view.group_size
        assert n == 8 and len(view.completions) == len(view.rewards) == len(view.advantages) == 16 * 8
        for start in range(0, len(view.completions), n):
            group = range(start, start + n)
            assert len({view.prompts[i] for i in group}) == 1
            assert f"copy {view.rows[start]['answer']}" in view.prompts[start]  # the row's own prompt, rendered
            rewards = [view.rewards[i] for i in group]
            assert rewards == [task(view.completions[i], view.rows[i]) for i in group]
            assert [view.advantages[i] for i in group] == pytest.approx(_grpo(rewards), abs=1e-5)
        assert all(view.kept)  # no dynamic sampling in the quickstart

    # CompletionLogger (every step here): the first 8 samples of each step, as the hook saw them.
    lines = [json.loads(line) for line in next(Path("runs/quickstart/csv").glob("version_*/completions.jsonl"))
             .read_text().splitlines()]
    assert len(lines) == 16
    for line, (view, i) in zip(lines, [(view, i) for view in views for i in range(8)]):
        assert line == {"step": view.step, "prompt": view.prompts[i], "completion": view.completions[i],
                        "answer": view.rows[i]["answer"], "reward": view.rewards[i],
                        "advantage": view.advantages[i]}


def test_tensorboard_config_logs_metrics_and_the_completion_table(tmp_path, tiny_model_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    _fit(tiny_model_dir, "--config", str(ROOT / "configs" / "loggers" / "tensorboard.yaml"),
         "--trainer.callbacks.init_args.every_n_steps=1")
    events = EventAccumulator(str(next(Path("runs/quickstart/tensorboard").glob("version_*"))),
                              size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward_mean")] == [0, 1]
    tables = events.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [0, 1]
    table = tables[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| step | prompt | completion | answer | reward | advantage |") and table.count("\n") == 9
    assert list(Path("runs/quickstart/csv").glob("version_0/metrics.csv"))  # the CSV logs stay first


def test_wandb_config_logs_offline_with_the_completion_table(tmp_path, tiny_model_dir, monkeypatch):
    wandb = pytest.importorskip("wandb")  # in the test extra (pyproject.toml)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        _fit(tiny_model_dir, "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml"),
             "--trainer.callbacks.init_args.every_n_steps=1")
        # What the run logged (its summary holds each key's last value). The offline history file is
        # written by wandb's service process, which may not have flushed it yet on a loaded machine.
        summary = dict(wandb.run.summary)
    finally:
        wandb.finish()  # Lightning leaves the run open in this process
    assert "train/reward_mean" in summary and "completions" in summary
    run = next(Path("runs/quickstart/wandb").glob("offline-run-*"))
    assert next(run.glob("run-*.wandb")).exists()  # what `wandb sync` uploads
    tables = sorted(run.glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "answer", "reward", "advantage"]
    assert len(table["data"]) == 8 and table["data"][0][0] == 0
