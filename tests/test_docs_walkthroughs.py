"""The documents a new user follows run as written (issue 21): the README's extension examples, from a
fresh clone's files; ``docs/first_hour.md`` end to end; ``docs/python_api.md``'s notebook code."""

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml
from markdown_runner import run_markdown

from archer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _fresh_clone(tmp_path: Path, monkeypatch) -> None:
    """The files of a clone the documents use (configs/), and the working directory there."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


def _steps(run: str) -> list[int]:
    frame = pd.concat(pd.read_csv(f) for f in sorted(Path(run).glob("csv/version_*/metrics.csv")))
    return sorted(frame.dropna(subset=["train/reward_mean"])["step"].astype(int))


def test_the_readme_extension_examples_run_as_written(tmp_path, monkeypatch, capsys):
    _fresh_clone(tmp_path, monkeypatch)
    main(["tiny-model", "runs/tiny-model"])  # the quickstart's step the section starts from
    run_markdown(_section((ROOT / "README.md").read_text(), "Extending"), tmp_path)
    saved = yaml.safe_load(Path("runs/my_reward/csv/version_0/config.yaml").read_text())
    assert saved["model"]["reward"] == {"class_path": "my_rewards.ContainsAnswer", "init_args": {"case_sensitive": True}}
    assert _steps("runs/my_reward") == _steps("runs/my_callbacks") == [0, 1, 2]
    out = capsys.readouterr().out
    assert sum(line.startswith("step ") and " scored " in line for line in out.splitlines()) == 3  # BestCompletion
    assert [line.split()[0] for line in out.splitlines() if line[:1].isdigit() and len(line.split()) == 2] == [
        "1", "2", "3"]  # PrintReward: global step and reward after each step


def test_first_hour_runs_end_to_end(tmp_path, monkeypatch):
    _fresh_clone(tmp_path, monkeypatch)
    run_markdown((ROOT / "docs" / "first_hour.md").read_text(), tmp_path)
    assert _steps("runs/quickstart") == list(range(15))  # trained 10 steps, then resumed to 15
    assert Path("runs/quickstart/report/reward.png").is_file()
    assert json.loads(Path("runs/eval/results.json").read_text())["mine"]["n"] == 4
    assert _steps("runs/my_data") == [0, 1, 2] and Path("runs/watch/csv/version_0/metrics.csv").is_file()
    assert Path("runs/compare/summary.md").is_file()


def test_python_api_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_markdown((ROOT / "docs" / "python_api.md").read_text(), tmp_path)
    assert namespace["reward"].index.tolist() == list(range(6))
    assert len(namespace["keep"].rewards) == 3
    assert set(namespace["results"]["copy"]["pass@k"]) == {"1", "4"}
