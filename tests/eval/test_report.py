"""``write_report`` on metrics written by Lightning's own CSV and TensorBoard loggers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from archer.report import load_metrics, metric_series, write_report

TRAIN_KEYS = [
    "train/reward_mean", "train/solve_rate", "train/response_length_mean", "train/response_clip_ratio",
    "train/entropy_reasoning", "train/entropy_knowledge", "train/clipfrac_reasoning", "train/clipfrac_knowledge",
]


def log_run(logger, steps: int = 6) -> None:
    """Train metrics every step, validation every 3rd step in separate calls: the CSV rows are sparse."""
    for step in range(steps):
        logger.log_metrics({key: 0.1 * step + i for i, key in enumerate(TRAIN_KEYS)}, step=step)
        if step % 3 == 0:
            logger.log_metrics({"val/gsm8k/pass@1": 0.1 * step, "val/gsm8k/pass@4": 0.2 * step}, step=step)
    logger.save()
    logger.finalize("success")


def write_token_view_json(folder: Path, step: int, token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sample = {"prompt": "p", "tokens": [token, "b"], "entropy": [0.5, 1.5], "reward": 1.0, "step": step}
    (folder / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "rho": 0.8, "samples": [sample]}))


def test_report_from_csv_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    log_run(logger)
    run_dir = tmp_path / "run"
    metrics = load_metrics(run_dir)
    # The val rows carry only val columns: a plotted series must drop NaNs, not read them as gaps.
    assert metrics["val/gsm8k/pass@4"].notna().sum() == 2
    write_token_view_json(run_dir / "version_0" / "token_view", 50, "older")
    write_token_view_json(run_dir / "version_0" / "token_view", 100, "newest")

    with caplog.at_level(logging.WARNING, logger="archer.report"):
        written = write_report(run_dir, tmp_path / "out")
    names = sorted(p.name for p in written)
    # No KL was logged: that figure is skipped with a note, the rest are written.
    assert names == sorted(
        ["reward.png", "pass_at_k.png", "response_length.png", "entropy.png", "clipfrac.png", "token_view.html"]
    )
    assert "skipping kl" in caplog.text
    for path in written:
        assert path.stat().st_size > 1000
    assert 'data-token="newest"' in (tmp_path / "out" / "token_view.html").read_text()


def test_a_resumed_run_s_versions_are_read_in_number_order_the_later_winning(tmp_path: Path) -> None:
    # version_2 logged steps 0-3; the run resumed from step 2 into version_10 (steps 2-4). version_2's
    # file is the newest on disk (a copy, a touch): the versions are still read by number, all of them,
    # and version_10's values win at steps 2 and 3.
    run_dir = tmp_path / "run"
    for version, steps in ((2, range(4)), (10, range(2, 5))):
        logger = CSVLogger(tmp_path, name="run", version=version)
        for step in steps:
            logger.log_metrics({"train/reward_mean": version + step / 10}, step=step)
        logger.save()
    os.utime(run_dir / "version_2" / "metrics.csv", (2e9, 2e9))
    series = metric_series(load_metrics(run_dir), "train/reward_mean")
    assert series.to_dict() == {0: 2.0, 1: 2.1, 2: 10.2, 3: 10.3, 4: 10.4}


def test_a_validate_run_in_the_run_folder_is_left_out(tmp_path: Path) -> None:
    """``archer validate --ckpt_path runs/x/checkpoints/last.ckpt`` logs into the run's logger folder as
    a version of its own, at step 0 whatever the checkpoint's step: its pass@1 is not the run's at step 0."""
    run_dir = tmp_path / "run"
    trained = CSVLogger(tmp_path, name="run", version=0)
    for step in range(3):
        trained.log_metrics({"train/reward_mean": step / 10}, step=step)
    trained.log_metrics({"val/x/pass@1": 0.5}, step=2)
    trained.save()
    validated = CSVLogger(tmp_path, name="run", version=1)
    validated.log_metrics({"val/x/pass@1": 0.9}, step=0)
    validated.save()
    metrics = load_metrics(run_dir)
    assert metric_series(metrics, "val/x/pass@1").to_dict() == {2: 0.5}
    assert metric_series(metrics, "train/reward_mean").to_dict() == {0: 0.0, 1: 0.1, 2: 0.2}


def test_report_from_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    log_run(logger)
    metrics = load_metrics(tmp_path / "tb")
    assert metrics.loc[metrics["step"] == 3, "val/gsm8k/pass@1"].item() == pytest.approx(0.3)
    written = write_report(tmp_path / "tb")
    assert (tmp_path / "tb" / "report" / "pass_at_k.png") in written


def test_no_metrics_names_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        write_report(tmp_path)
