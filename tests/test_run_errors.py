"""A user's mistake ends ``archer`` in one line naming what to change (issue 21, items 3, 4, 5, 8):
bad rows, empty files, settings out of range, a reward that fails on every call, a rerun in a used run
folder; the traceback only with ``--verbose``; no log folder left behind by a start that failed."""

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archer.cli import main
from archer.data import PromptDataModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--data.train_size=32", "--data.val_size=0"]


def _fit(model_dir: str, *args: str) -> None:
    main(["fit", "--config", QUICKSTART, f"--model.model_path={model_dir}", *SMALL, *args])


def _stops(capsys, model_dir: str, *args: str) -> str:
    """The one line ``archer fit`` stops with (nothing of a traceback on stderr)."""
    with pytest.raises(SystemExit) as stop:
        _fit(model_dir, *args)
    message = str(stop.value.code)
    assert "\n" not in message.strip() and "Traceback" not in capsys.readouterr().err, message
    return message


def test_a_bad_row_names_file_line_field_and_the_fix(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train.jsonl").write_text('{"prompt": "copy 3", "answer": "3"}\n{"prompt": "copy 5", "solution": "5"}\n')
    message = _stops(capsys, tiny_model_dir, "--data.train_files=[train.jsonl]",
                     "--model.reward=archer.rewards.ExactMatchReward")
    assert message.startswith("archer fit: train.jsonl:2:answer: missing (a row needs an answer or tests) — "
                              "choose the fields with data.prompt_key / data.answer_key")
    assert "data.skip_bad_rows" in message
    assert not Path("runs").exists() or not any(Path("runs").rglob("version_*"))


def test_an_empty_file_says_it_has_no_rows(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.jsonl").write_text("")
    message = _stops(capsys, tiny_model_dir, "--data.train_files=[empty.jsonl]",
                     "--model.reward=archer.rewards.ExactMatchReward")
    assert message.startswith("archer fit: data set 'train' (empty.jsonl) has no rows")


def test_a_setting_out_of_range_is_one_line_and_leaves_no_log_folder(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A negative learning rate fails in configure_optimizers, after Lightning saved config.yaml into
    csv/version_0: that folder of a run that never trained is removed again."""
    monkeypatch.chdir(tmp_path)
    message = _stops(capsys, tiny_model_dir, "--model.optim.lr=-1")
    assert message.startswith("archer fit: Invalid learning rate: -1")
    saved = message.partition("  (traceback: ")[2].removesuffix(")")
    assert "Invalid learning rate" in Path(saved).read_text()  # the traceback, in the file the line names
    assert not list(Path("runs/quickstart/csv").glob("version_*"))


def test_verbose_shows_the_exception_itself(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ARCHER_VERBOSE", raising=False)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        _fit(tiny_model_dir, "--model.optim.lr=-1", "--verbose")


def test_a_rerun_in_a_used_run_folder_is_refused_and_resume_continues_it(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A second fresh run would write last-v1.ckpt beside the first run's last.ckpt (and --ckpt_path last
    then takes whichever is newer)."""
    monkeypatch.chdir(tmp_path)
    _fit(tiny_model_dir, "--trainer.max_steps=1")
    message = _stops(capsys, tiny_model_dir, "--trainer.max_steps=1")
    assert message.startswith(f"archer fit: {tmp_path}/runs/quickstart/checkpoints holds checkpoints of an earlier "
                              "run (last.ckpt): resume it with --ckpt_path last, or start a new run in another "
                              "folder with --trainer.default_root_dir DIR")
    assert [p.name for p in Path("runs/quickstart/csv").iterdir()] == ["version_0"]  # refused before logging
    _fit(tiny_model_dir, "--trainer.max_steps=2", "--ckpt_path=last")
    assert sorted(p.name for p in Path("runs/quickstart/checkpoints").iterdir()) == ["last.ckpt"]
    steps = pd.concat(pd.read_csv(f) for f in sorted(Path("runs/quickstart/csv").glob("version_*/metrics.csv")))
    assert sorted(steps.dropna(subset=["train/reward_mean"])["step"]) == [0, 1]


BROKEN_REWARD = '''
class Broken:
    """Reads a field the rows do not have."""

    def __call__(self, response: str, row: dict) -> float:
        return float(row["solution"] in response)
'''


def test_a_reward_that_fails_on_every_call_stops_the_run(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Before: a warning per step, reward 0 throughout, exit 0 after max_steps."""
    monkeypatch.chdir(tmp_path)
    Path("broken_reward_mod.py").write_text(BROKEN_REWARD)
    message = _stops(capsys, tiny_model_dir, "--model.reward=broken_reward_mod.Broken",
                     "--model.max_failed_reward_steps=2", "--trainer.max_steps=6")
    assert message.startswith("archer fit: every reward call failed in 2 RL steps in a row "
                              "(model.max_failed_reward_steps = 2); the last step's first error: item 0: KeyError: "
                              "'solution'. Fix the reward or the rows it reads (data.answer_key)")
    metrics = pd.read_csv(next(Path("runs/quickstart/csv").glob("version_*/metrics.csv")))
    train = metrics.dropna(subset=["reward/errors"])
    # Step 0's metrics; step 1 stopped the run inside its training_step, before Lightning logged them.
    assert train["step"].tolist() == [0] and (train["reward/errors"] == 16 * 8).all()  # batch 16, n 8


def test_skip_bad_rows_logs_how_many_it_skipped(tmp_path, tiny_model_dir, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\nnot json\n{"prompt": "c", "answer": "2"}\n')
    datamodule = PromptDataModule(tiny_model_dir, train_files=[str(path)], skip_bad_rows=True, batch_size=2)
    with caplog.at_level("WARNING", logger="archer.data.datamodule"):
        datamodule.setup()
    assert len(datamodule.train_items) == 2
    assert f"data set 'train': skipped 2 bad rows of {path}" in caplog.text


def test_data_inspect_shows_the_schema_before_a_bad_row(tmp_path, tiny_model_dir, capsys):
    """A verl-style parquet whose prompt column is ``question``: the schema, then the error and its fix."""
    path = tmp_path / "verl.parquet"
    rows = [{"data_source": "gsm8k", "question": f"{i} + 1 = ?", "reward_model": {"ground_truth": str(i + 1)}}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(SystemExit) as stop:
        main(["data", "inspect", str(path), "--model", tiny_model_dir])
    out = capsys.readouterr().out
    assert "schema:\n  data_source: string\n  question: string\n  reward_model: struct<ground_truth: string>" in out
    message, _, saved = str(stop.value.code).partition("  (traceback: ")
    assert message == (f"archer data: {path}:1:prompt: missing — choose the fields with --prompt-key / "
                       "--answer-key, or skip bad rows with --skip-bad-rows")
    # the traceback is kept in a file the line names (an error hours into a run needs no rerun to show it)
    assert "BadRowError" in Path(saved.removesuffix(")")).read_text()
