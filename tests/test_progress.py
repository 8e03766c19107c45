"""Progress when nobody watches and after a resume (issue 21, items 3 and 7): one line per step when
standard output is not a terminal; the terminal bar counts the run's steps out of max_steps after a
resume and shows no ``v_num``; ``archer report`` reads every version of a resumed run."""

import io
import re
from pathlib import Path

import yaml

from archer.callbacks import RLProgressBar
from archer.callbacks.progress import format_duration
from archer.cli import main
from archer.report import load_metrics, metric_series

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--data.train_size=32"]


class TerminalBar(RLProgressBar):
    """The rich bar drawn as in a terminal (into a string); records (count, total, v_num shown) per step."""

    seen: list = []

    def __init__(self) -> None:
        super().__init__(console_kwargs={"force_terminal": True, "file": io.StringIO()})
        self.lines = False  # a bar, though pytest's stdout is not a terminal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = self.train_progress_bar
        TerminalBar.seen.append((int(task.completed), task.total, "v_num" in self.get_metrics(trainer, pl_module)))


def _fit(model_dir: str, *args: str) -> None:
    main(["fit", "--config", QUICKSTART, f"--model.model_path={model_dir}", *SMALL, *args])


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 60, 530, 3599, 3600, 11220)] == [
        "0s", "42s", "1m00s", "8m50s", "59m59s", "1h00m", "3h07m"]


def test_one_line_per_step_when_stdout_is_not_a_terminal(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tiny_model_dir, "--trainer.max_steps=3", "--trainer.val_check_interval=2", "--data.val_size=16")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("step ", "validation "))]
    number = r"\d+\.\d{3}"
    assert re.fullmatch(rf"step 1/3  reward {number}  \d+\.\d\d s/step  ETA \d+s", lines[0]), lines
    assert re.fullmatch(rf"step 2/3  reward {number}  \d+\.\d\d s/step  ETA \d+s", lines[1]), lines
    assert re.fullmatch(rf"validation at step 2: digit_copy/pass@1 {number}  digit_copy/pass@4 {number}", lines[2])
    pass_at_1 = lines[2].split()[5]
    assert re.fullmatch(rf"step 3/3  reward {number}  digit_copy pass@1 {pass_at_1} \(step 2\)  \d+\.\d\d s/step  ETA 0s",
                        lines[3]), lines
    assert len(lines) == 4


def test_a_resumed_run_counts_its_steps_and_report_reads_all_of_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(tiny_model_dir, "--trainer.max_steps=2", "--data.val_size=0")
    callbacks = tmp_path / "bar.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "test_progress.TerminalBar"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "runs/quickstart/checkpoints", "save_last": True}},
    ]}}))
    TerminalBar.seen = []
    _fit(tiny_model_dir, "--config", str(callbacks), "--trainer.max_steps=4", "--data.val_size=0", "--ckpt_path=last")
    # Lightning's bar read 3/2 and 4/2 (its total: the steps left) and showed v_num.
    assert TerminalBar.seen == [(3, 4, False), (4, 4, False)]
    versions = sorted(p.name for p in Path("runs/quickstart/csv").iterdir())
    assert versions == ["version_0", "version_1"]
    assert all((Path("runs/quickstart/csv") / v / "metrics.csv").is_file() for v in versions)
    reward = metric_series(load_metrics("runs/quickstart"), "train/reward_mean")
    assert reward.index.tolist() == [0, 1, 2, 3]
