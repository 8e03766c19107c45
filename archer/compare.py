"""``archer compare``: the same job under several variants and seeds, then one plot per metric and a table.

    archer compare CONFIG --variants A.yaml B.yaml ... --seeds N --out OUT [--set KEY=VALUE ...]

Each run is ``archer fit --config CONFIG --config VARIANT --config OUT/runs/VARIANT/seedS/paths.yaml
[--KEY=VALUE ...] --seed_everything=S``, in a subprocess, one after the other (seed by seed, so an
interrupted comparison already has whole seeds). ``paths.yaml`` gives the run its own folder: the
default root dir, a ``CSVLogger`` under it (the comparison reads its ``metrics.csv``) and the
``dirpath`` of every ``ModelCheckpoint`` in the configs' callback list. A run that fails is reported
and the others go on. Running the same command again skips the finished runs (``run.json`` records
each run's command, a digest of its config files and the outcome), resumes an unfinished one from
its ``checkpoints/last.ckpt`` and starts afresh a run whose command or config files changed.

Then, per metric (:data:`METRICS`, plus every ``val/*/pass@k`` column logged), ``OUT/<metric>.png``
(a rerun deletes its plots of metrics no longer logged, and no other PNG):
for each variant the mean over seeds of the smoothed curves with a min–max band, and
``OUT/summary.md``: per metric and variant the final and best values, mean ± sample standard
deviation over seeds. "Final" is the trailing mean over the last 10% of a run's logged points (at
least one; the same window smooths the plotted curves), "best" the maximum of that trailing mean
(for metrics where higher is better). The aggregation is pure functions of pandas series
(:func:`smooth`, :func:`final_and_best`, :func:`mean_and_spread`, :func:`seed_band`). The summary
also names the loss each variant trained with, from the config Lightning saved, with the settings
that differ from its class's defaults: jsonargparse keeps the settings two loss classes share when a
later config changes ``class_path``, so a variant that names only ``DAPOLoss`` on top of an
``ArcherLoss`` base trains with ``loss_agg=seq-mean-token-mean``, and the table shows it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from archer.export import is_distributed_checkpoint
from archer.report import PASS_AT_K_PATTERN, metric_series, version_files  # also selects matplotlib's headless backend

import matplotlib.pyplot as plt  # noqa: E402  (after archer.report chose the backend)

__all__ = [
    "Metric", "METRICS", "Run", "compare", "final_and_best", "loss_as_run", "loss_changes", "mean_and_spread",
    "paths_config", "plan_runs", "read_run_metrics", "seed_band", "smooth", "window",
]

FINAL_FRACTION = 0.1
"""The trailing window of "final" values and of the plotted curves, as a fraction of a run's logged points."""


@dataclass(frozen=True)
class Metric:
    """A metric column the comparison plots and tabulates."""

    column: str
    """Column of ``metrics.csv``."""
    better: str | None = None
    """``"max"`` or ``"min"``: which way is better (the table's "best"); None: no best (descriptive metric)."""


METRICS: tuple[Metric, ...] = (
    Metric("train/reward_mean", "max"),
    Metric("train/entropy"),
    Metric("train/response_length_mean"),
    Metric("train/clipfrac"),
    Metric("train/clipfrac_reasoning"),
    Metric("train/clipfrac_knowledge"),
)
"""The training metrics compared; every logged ``val/*/pass@k`` (and ``avg@k``) column is added, higher is better."""


@dataclass(frozen=True)
class Run:
    """One ``archer fit`` of the comparison."""

    variant: str
    """The variant's name (its file's stem)."""
    variant_file: Path
    """The variant's YAML file."""
    seed: int
    """``seed_everything`` of the run."""
    dir: Path
    """The run's own folder, ``OUT/runs/<variant>/seed<seed>``."""


# ------------------------------------------------------------------------------------- aggregation
def window(points: int, fraction: float = FINAL_FRACTION) -> int:
    """The trailing window of a run with ``points`` logged points: ``max(1, ⌊fraction·points⌋)``."""
    return max(1, int(points * fraction))


def smooth(series: pd.Series, fraction: float = FINAL_FRACTION) -> pd.Series:
    """Trailing mean over the last :func:`window` points of ``series`` (index: step) at each step.

    The first ``window − 1`` steps, where the window is not yet full, are dropped.
    """
    size = window(len(series), fraction)
    return series.rolling(size).mean().iloc[size - 1:]


def final_and_best(
    series: pd.Series, better: str | None, fraction: float = FINAL_FRACTION
) -> tuple[float, float | None]:
    """``(final, best)`` of one run's metric: the last value of :func:`smooth` (the mean of the last
    ``max(1, ⌊fraction·n⌋)`` points) and its maximum (``better="max"``) or minimum (``"min"``), None
    when ``better`` is None."""
    smoothed = smooth(series.dropna(), fraction)
    if smoothed.empty:
        return math.nan, None if better is None else math.nan
    final = float(smoothed.iloc[-1])
    if better is None:
        return final, None
    return final, float(smoothed.max() if better == "max" else smoothed.min())


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of per-seed values, NaNs left out."""
    finite = pd.Series(values, dtype=float).dropna()
    if finite.empty:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else 0.0


def seed_band(curves: Sequence[pd.Series]) -> pd.DataFrame:
    """Per step logged by every seed: the ``mean``, ``low`` (min) and ``high`` (max) over the seeds' curves."""
    if not curves:
        return pd.DataFrame(columns=["mean", "low", "high"])
    frame = pd.concat(list(curves), axis=1, join="inner")
    return pd.DataFrame({"mean": frame.mean(axis=1), "low": frame.min(axis=1), "high": frame.max(axis=1)})


# ------------------------------------------------------------------------------------- the runs
def plan_runs(variants: Sequence[str | Path], seeds: Sequence[int], out: str | Path) -> list[Run]:
    """The runs in the order they execute: every variant for the first seed, then the next seed."""
    files = [Path(v) for v in variants]
    names = [f.stem for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant files must have distinct names (their stems name the variants): {duplicates}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"variant files not found: {missing}")
    for f in files:  # a YAML error stops the comparison now, not after the runs before it
        yaml.safe_load(f.read_text(encoding="utf-8"))
    return [Run(f.stem, f, seed, Path(out) / "runs" / f.stem / f"seed{seed}") for seed in seeds for f in files]


def _callbacks(config_files: Sequence[Path]) -> list | None:
    """``trainer.callbacks`` of the last file that sets it (a later list replaces an earlier one)."""
    found = None
    for path in config_files:
        trainer = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
        if "callbacks" in trainer:
            found = trainer["callbacks"]
    return found


def paths_config(run_dir: Path, config_files: Sequence[Path]) -> dict:
    """The third ``--config`` of a run: its own root dir, CSV logs and checkpoint folder."""
    root = str(run_dir)
    trainer: dict = {
        "default_root_dir": root,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": root, "name": "csv", "version": None}},
    }
    callbacks = _callbacks(config_files)
    if callbacks is not None:
        trainer["callbacks"] = [
            {**cb, "init_args": {**(cb.get("init_args") or {}), "dirpath": str(run_dir / "checkpoints")}}
            if isinstance(cb, dict) and str(cb.get("class_path", "")).split(".")[-1] == "ModelCheckpoint" else cb
            for cb in callbacks
        ]
    return {"trainer": trainer}


def _fit_argv(run: Run, config: Path, overrides: dict[str, str]) -> list[str]:
    paths = run.dir / "paths.yaml"
    return ["fit", "--config", str(config), "--config", str(run.variant_file), "--config", str(paths),
            *(f"--{key}={value}" for key, value in overrides.items()), f"--seed_everything={run.seed}"]


def _digests(files: Sequence[Path]) -> dict[str, str]:
    """SHA-256 of each config file's content: an edited variant makes its runs start again."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def _read_record(run: Run) -> dict | None:
    path = run.dir / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_record(run: Run, record: dict) -> None:
    path = run.dir / "run.json"
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")


def execute(run: Run, config: Path, overrides: dict[str, str]) -> dict:
    """Run (or skip, or resume) one ``archer fit`` in a subprocess; return its ``run.json`` record.

    The record holds ``argv``, ``files`` (:func:`_digests` of the config and the variant),
    ``status`` (``done`` / ``failed`` / ``running`` while it runs or after an interruption),
    ``returncode`` and ``wall_s``. A run whose ``argv`` or ``files`` changed starts afresh.
    Output goes to ``output.log``.
    """
    argv = _fit_argv(run, config, overrides)
    files = _digests([config, run.variant_file])
    record = _read_record(run)
    same = record is not None and record["argv"] == argv and record.get("files") == files
    if same and record["status"] == "done":
        print(f"archer compare: {run.variant} seed {run.seed}: done before, skipped", flush=True)
        return record
    last = run.dir / "checkpoints" / "last.ckpt"
    resume = same and (last.is_file() or is_distributed_checkpoint(last))  # a folder under FSDP2
    if record is not None and not resume:
        shutil.rmtree(run.dir)  # its command or files changed (or it never saved a checkpoint): start afresh
    elif record is None and run.dir.exists() and any(run.dir.iterdir()):
        raise FileExistsError(f"{run.dir} exists and is not a run of archer compare (no run.json); move it away")
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "paths.yaml").write_text(
        yaml.safe_dump(paths_config(run.dir, [config, run.variant_file])), encoding="utf-8"
    )
    command = [*argv, f"--ckpt_path={run.dir / 'checkpoints' / 'last.ckpt'}"] if resume else argv
    print(f"archer compare: {run.variant} seed {run.seed}: {'resuming' if resume else 'running'}, "
          f"log {run.dir / 'output.log'}", flush=True)
    _write_record(run, {"argv": argv, "files": files, "status": "running"})
    start = time.monotonic()
    with open(run.dir / "output.log", "a", encoding="utf-8") as log:
        log.write(f"$ archer {shlex.join(command)}\n")
        log.flush()
        # Its own process group: an interrupt stops the run and its reward workers, not only the trainer.
        process = subprocess.Popen([sys.executable, "-m", "archer.cli", *command], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    record = {"argv": argv, "files": files, "status": "done" if returncode == 0 else "failed",
              "returncode": returncode, "wall_s": round(time.monotonic() - start, 1), "resumed": resume}
    _write_record(run, record)
    if returncode != 0:
        tail = (run.dir / "output.log").read_text(encoding="utf-8").splitlines()[-15:]
        print(f"archer compare: {run.variant} seed {run.seed} FAILED (exit {returncode}):\n  "
              + "\n  ".join(tail), file=sys.stderr, flush=True)
    return record


def read_run_metrics(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``csv/version_*/metrics.csv`` in version order, concatenated (a resumed run logs to a
    new version; :func:`~archer.report.metric_series` then keeps the later value of a step logged twice)."""
    files = version_files(Path(run_dir) / "csv")
    if not files:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir}")
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def loss_changes(loss: dict) -> dict:
    """The settings of a resolved ``model.loss`` (``{"class_path", "init_args"}``) that differ from its
    class's defaults: what a config set, or what jsonargparse carried over from another loss class
    (it keeps the settings two classes share when ``class_path`` changes)."""
    module, _, name = loss["class_path"].rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    changed = {}
    for key, value in (loss.get("init_args") or {}).items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if (list(default) if isinstance(default, tuple) else default) != value:
            changed[key] = value
    return changed


def loss_as_run(run_dir: Path) -> str:
    """``Class(key=value, ...)``: the loss a run trained with, from the config Lightning saved in its
    log folder, with the settings that differ from the class's defaults (:func:`loss_changes`)."""
    saved = version_files(run_dir / "csv", "config.yaml")  # the first version's: the config it started with
    if not saved:
        return "?"
    loss = yaml.safe_load(saved[0].read_text(encoding="utf-8"))["model"]["loss"]
    changed = ", ".join(f"{key}={value}" for key, value in loss_changes(loss).items())
    name = loss["class_path"].rpartition(".")[2]
    return f"{name}({changed})" if changed else name


# ------------------------------------------------------------------------------------- output
def _metrics_present(runs: dict[Run, pd.DataFrame]) -> list[Metric]:
    columns = set().union(*(frame.columns for frame in runs.values())) if runs else set()
    validation = sorted(c for c in columns if PASS_AT_K_PATTERN.match(c))
    return [m for m in METRICS if m.column in columns] + [Metric(c, "max") for c in validation]


def _file_name(column: str) -> str:
    return column.replace("/", "_").replace("@", "_at_") + ".png"


_VALIDATION_PLOT = re.compile(r"^val_.+_(pass|avg)_at_\d+\.png$")
"""The file names :func:`_file_name` gives ``val/*/pass@k`` and ``avg@k`` columns."""


def _is_metric_plot(name: str) -> bool:
    """Whether ``name`` is a file name this module writes plots to (a metric of :data:`METRICS`, or a
    validation pass@k / avg@k column): the only PNGs a new comparison may delete from ``OUT``."""
    return name in {_file_name(metric.column) for metric in METRICS} or _VALIDATION_PLOT.match(name) is not None


def _by_variant(per_run: dict[Run, pd.Series]) -> dict[str, list[pd.Series]]:
    grouped: dict[str, list[pd.Series]] = {}
    for run, series in per_run.items():
        grouped.setdefault(run.variant, []).append(series)
    return grouped


def _plot(metric: Metric, curves: dict[str, list[pd.Series]], out: Path) -> Path:
    """One PNG: per variant, the mean over seeds of the smoothed curves and their min–max band."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for variant, series in curves.items():
        band = seed_band([smooth(s) for s in series])
        line, = ax.plot(band.index, band["mean"], label=f"{variant} ({len(series)} seeds)", linewidth=1.5)
        ax.fill_between(band.index, band["low"], band["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    sizes = sorted({window(len(s)) for series in curves.values() for s in series})
    points = "/".join(map(str, sizes))
    smoothing = "values as logged" if sizes == [1] else f"each run's trailing mean over {points} points"
    ax.set_title(f"{metric.column}: mean over seeds, band min–max\n({smoothing})", fontsize=9)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / _file_name(metric.column)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _cell(values: Sequence[float]) -> str:
    mean, spread = mean_and_spread(values)
    return "–" if math.isnan(mean) else f"{mean:.3g} ± {spread:.2g}"


def _summary(config: Path, runs: list[Run], records: dict[Run, dict], series: dict[Metric, dict[Run, pd.Series]],
             plots: list[Path], overrides: dict[str, str]) -> str:
    variants = list(dict.fromkeys(run.variant for run in runs))
    seeds = list(dict.fromkeys(run.seed for run in runs))
    lines = [
        "# archer compare", "",
        f"Config `{config}`, seeds {', '.join(map(str, seeds))}"
        + (f", overrides `{' '.join(f'--{k}={v}' for k, v in overrides.items())}`" if overrides else "") + ".", "",
        f"Final: the trailing mean over the last {FINAL_FRACTION:.0%} of a run's logged points (at least one); "
        "best: the highest value of that trailing mean; each cell mean ± sample standard deviation over "
        "the seeds that finished.", "",
        "| metric | variant | final | best | seeds |", "|---|---|---|---|---|",
    ]
    for metric, per_run in series.items():
        grouped = _by_variant(per_run)
        for variant in variants:
            values = [final_and_best(s, metric.better) for s in grouped.get(variant, [])]
            best = "–" if metric.better is None else _cell([v[1] for v in values])
            lines.append(f"| {metric.column} | {variant} | {_cell([v[0] for v in values])} | {best} | {len(values)} |")
    lines += ["", "## Variants", "", "| variant | file | loss as run |", "|---|---|---|"]
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        finished = [r for r in mine if records[r]["status"] == "done"]
        loss = loss_as_run(finished[0].dir) if finished else "–"
        lines.append(f"| {variant} | `{mine[0].variant_file}` | {loss} |")
    steps = next((per_run for metric, per_run in series.items() if metric.column == METRICS[0].column), {})
    lines += ["", "## Runs", "", "| variant | seed | status | RL steps | wall s | folder |",
              "|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.variant} | {run.seed} | {records[run]['status']} | {len(steps.get(run, ()))} | "
                     f"{records[run].get('wall_s', '–')} | `{run.dir}` |")
    lines += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
    return "\n".join(lines)


def compare(
    config: str | Path, variants: Sequence[str | Path], seeds: int | Sequence[int], out: str | Path,
    overrides: dict[str, str] | None = None,
) -> tuple[Path, list[Run]]:
    """Run every variant × seed, then write the plots and ``OUT/summary.md``.

    Args:
        config: the base ``archer fit`` config.
        variants: YAML files, each the second ``--config`` of its runs; their stems name them.
        seeds: the number of seeds (0, 1, ...) or the seeds themselves.
        out: the output folder (runs under ``out/runs``; plots and ``summary.md`` at its top).
        overrides: ``KEY=VALUE`` pairs passed to every run as ``--KEY=VALUE``.

    Returns:
        The summary's path and the runs that failed.
    """
    config, out, overrides = Path(config), Path(out), dict(overrides or {})
    if not config.is_file():
        raise FileNotFoundError(f"config {config} not found")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("at least one seed is needed")
    runs = plan_runs(variants, seed_list, out)
    records = {run: execute(run, config, overrides) for run in runs}
    frames = {run: read_run_metrics(run.dir) for run in runs if records[run]["status"] == "done"}
    series = {  # metric -> run -> its logged values by step
        metric: {run: values for run, frame in frames.items()
                 if metric.column in frame and not (values := metric_series(frame, metric.column)).empty}
        for metric in _metrics_present(frames)
    }
    for stale in out.glob("*.png"):  # plots of metrics no longer logged must not linger ...
        if _is_metric_plot(stale.name):  # ... but other PNGs in OUT are not ours to delete
            stale.unlink()
    plots = [_plot(metric, _by_variant(per_run), out) for metric, per_run in series.items() if per_run]
    summary = out / "summary.md"
    summary.write_text(_summary(config, runs, records, series, plots, overrides), encoding="utf-8")
    return summary, [run for run in runs if records[run]["status"] != "done"]
