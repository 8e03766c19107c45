"""``archer report RUN_DIR``: plots of a run's logged metrics plus its newest token view.

Metrics come from Lightning's ``CSVLogger`` (``metrics.csv``, found anywhere under the run
directory; its rows are sparse — each row holds only what was logged at that step; a resumed run
logs to a new ``version_N`` folder beside the first, and all of them are read, in order of N, but
those with validation figures only, which ``archer validate`` writes there) or,
when there is no CSV, from TensorBoard event files. Each figure is one PNG; a figure whose metrics
were never logged is skipped with a logged note (a baseline run has no per-type KL, say).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from archer.token_view import write_token_view  # noqa: E402

__all__ = [
    "Figure", "FIGURES", "STEP_COLUMN", "PASS_AT_K_PATTERN", "load_metrics", "metric_series", "version_files",
    "version_number", "write_report",
]

log = logging.getLogger(__name__)

STEP_COLUMN = "step"
PASS_AT_K_PATTERN = re.compile(r"^val/.+/(pass|avg)@\d+$")
VERSION_PATTERN = re.compile(r"version_(\d+)")


@dataclass(frozen=True)
class Figure:
    """One PNG: a row of axes, each plotting some metric columns over ``step``."""

    name: str
    """File stem of the PNG."""
    title: str
    """Figure title."""
    axes: tuple[tuple[str, ...], ...]
    """Metric columns per axes; an empty tuple means "every ``val/*/pass@*`` / ``avg@*`` column"."""


FIGURES: tuple[Figure, ...] = (
    Figure("reward", "Reward", (("train/reward_mean", "train/solve_rate"),)),
    Figure("pass_at_k", "Validation pass@k", ((),)),
    Figure(
        "response_length",
        "Response length",
        (("train/response_length_mean",), ("train/response_clip_ratio",)),
    ),
    Figure(
        "entropy", "Entropy: reasoning vs knowledge tokens", (("train/entropy_reasoning", "train/entropy_knowledge"),)
    ),
    Figure("clipfrac", "Clip fraction per token type", (("train/clipfrac_reasoning", "train/clipfrac_knowledge"),)),
    Figure("kl", "KL to reference per token type", (("train/kl_reasoning", "train/kl_knowledge"),)),
)


def _newest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: p.stat().st_mtime)


def version_number(folder: Path) -> int | None:
    """N of a Lightning logger's ``version_N`` folder; None for any other name."""
    match = VERSION_PATTERN.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def version_files(logger_dir: str | Path, name: str = "metrics.csv") -> list[Path]:
    """``logger_dir/version_N/<name>`` files in order of N (by number: ``version_10`` after ``version_2``)."""
    numbered = [(version_number(path.parent), path) for path in Path(logger_dir).glob(f"version_*/{name}")]
    return [path for _, path in sorted((n, p) for n, p in numbered if n is not None)]


def _load_tensorboard(event_files: list[Path]) -> pd.DataFrame:
    """Scalars of every event file as one long-to-wide frame with a ``step`` column."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records: dict[tuple[int, str], float] = {}
    for path in sorted(event_files):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                records[(event.step, tag)] = event.value
    if not records:
        return pd.DataFrame({STEP_COLUMN: []})
    series = pd.Series(records)
    frame = series.unstack()
    frame.index.name = STEP_COLUMN
    return frame.reset_index()


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The run's metrics as a frame with a ``step`` column (NaN where a metric was not logged).

    Prefers the newest ``metrics.csv`` under ``run_dir`` (CSVLogger) — when it lies in a
    ``version_N`` folder, with those of every ``version_N`` beside it, concatenated in order of N (a
    resumed run's rows come after the first run's; :func:`metric_series` keeps the later value of a
    step logged twice), leaving out versions with validation figures only (``archer validate`` of a
    checkpoint logs there too, at step 0) — else TensorBoard event files (``events.out.tfevents.*``)
    in the newest folder that has them.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    csv_files = list(root.rglob("metrics.csv"))
    if csv_files:
        newest = _newest(csv_files)
        paths = version_files(newest.parent.parent) if version_number(newest.parent) is not None else [newest]
        frames = {}
        for path in paths:
            frames[path] = pd.read_csv(path)
            if STEP_COLUMN not in frames[path].columns:
                raise ValueError(f"{path}: no {STEP_COLUMN!r} column (columns: {list(frames[path].columns)})")
        trained = {path: frame for path, frame in frames.items() if _trained(frame)}
        if trained and len(trained) < len(frames):
            # `archer validate` logs into the run's folder too, at step 0 whatever the checkpoint's step.
            log.warning("report: left out %s (validation only: archer validate)",
                        ", ".join(str(path.parent) for path in frames if path not in trained))
            frames = trained
        log.info("metrics from %s", ", ".join(map(str, frames)))
        return pd.concat(frames.values(), ignore_index=True)
    event_files = list(root.rglob("events.out.tfevents.*"))
    if event_files:
        folder = _newest(event_files).parent
        log.info("metrics from TensorBoard events in %s", folder)
        return _load_tensorboard([p for p in event_files if p.parent == folder])
    raise FileNotFoundError(
        f"no metrics under {root}: expected a CSVLogger metrics.csv or TensorBoard events.out.tfevents.* file"
    )


def _trained(frame: pd.DataFrame) -> bool:
    """Whether a version's metrics have training steps (``train/*``), not only validation figures."""
    return any(column.startswith("train/") for column in frame.columns)


def metric_series(metrics: pd.DataFrame, column: str) -> pd.Series:
    """One metric's logged values indexed by step (sorted), its last value where a step logged it twice.

    ``metrics`` has sparse rows (each row holds only what was logged at that step); rows of a resumed
    run appended after the first run's rows override the steps both logged.
    """
    points = metrics[[STEP_COLUMN, column]].dropna()
    return points.groupby(STEP_COLUMN)[column].last()


def _plot(figure: Figure, metrics: pd.DataFrame, out_dir: Path) -> Path | None:
    """Draw one figure from the columns present; None (with a note) when none are."""
    axes_columns = []
    for wanted in figure.axes:
        if not wanted:
            wanted = tuple(sorted(c for c in metrics.columns if PASS_AT_K_PATTERN.match(c)))
        present = [c for c in wanted if c in metrics.columns and metrics[c].notna().any()]
        missing = [c for c in wanted if c not in present]
        if missing and present:
            log.warning("report %s: not logged, left out: %s", figure.name, ", ".join(missing))
        if present:
            axes_columns.append(present)
    if not axes_columns:
        wanted_names = [c for group in figure.axes for c in group] or ["val/<dataset>/pass@<k>"]
        log.warning("report: skipping %s, none of %s was logged", figure.name, ", ".join(wanted_names))
        return None
    fig, axes = plt.subplots(1, len(axes_columns), figsize=(6 * len(axes_columns), 4), squeeze=False)
    for ax, columns in zip(axes[0], axes_columns):
        for column in columns:
            points = metric_series(metrics, column)
            style = "--" if "/avg@" in column else "-"
            ax.plot(points.index, points.to_numpy(), style, marker="o" if len(points) < 30 else None,
                    markersize=3, label=column)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(figure.title)
    fig.tight_layout()
    path = out_dir / f"{figure.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_latest_token_view(run_dir: Path, out_dir: Path) -> Path | None:
    views = list(run_dir.rglob("token_view/*.json"))
    if not views:
        log.warning("report: no token_view/*.json under %s (add TokenViewCallback to write one)", run_dir)
        return None
    # Files are step_{step:06d}.json: the name orders them by step across restarts.
    newest = max(views, key=lambda p: (p.name, p.stat().st_mtime))
    try:
        payload = json.loads(newest.read_text(encoding="utf-8"))
        samples, rho = payload["samples"], float(payload["rho"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{newest}: not a token view file ({{'step', 'rho', 'samples'}}): {error}") from error
    return write_token_view(samples, rho, out_dir / "token_view.html")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's metric plots (PNG) and newest token view (HTML); return the written paths.

    Args:
        run_dir: the run's log directory (searched recursively for ``metrics.csv``, TensorBoard
            events and ``token_view/*.json``).
        out_dir: where to write; defaults to ``run_dir/report``.
    """
    root = Path(run_dir)
    metrics = load_metrics(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = [path for figure in FIGURES if (path := _plot(figure, metrics, out)) is not None]
    token_view = _write_latest_token_view(root, out)
    if token_view is not None:
        written.append(token_view)
    return written
