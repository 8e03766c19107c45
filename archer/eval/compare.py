"""The paper's table for several models: rows models, columns benchmarks, and each model's paired
difference against the first.

``archer eval A=MODEL_A B=MODEL_B ... --data ... --out OUT`` (:func:`evaluate_models`) runs one
complete eval per model into ``OUT/<name>`` (each resumable as a single eval is: a rerun samples
only what is missing, and a folder evaluated before with the same settings is reused), then writes
``OUT/table.md``, ``OUT/table.png`` and ``OUT/table.json`` (:func:`write_table`, which also takes
eval folders made separately).

Per model and benchmark the table shows avg@n with its 95 % bootstrap interval over problems and
the largest pass@k. Below it, for every other model, the **paired difference** against the first
model: with ``v_m(i)`` a figure of model ``m`` on problem ``i`` (avg@n, pass@k) and ``P`` problems,

    Δ = (1/P) Σ_i (v_m(i) − v_first(i))

with a percentile bootstrap interval that resamples problems (both models' values of a problem
together). Because both models answered the same problems, sampled with the same per-chunk seeds,
problem difficulty cancels out of Δ, and its interval is narrower than the two models'
intervals side by side suggest. A difference is shown only where both evals have the same problems
and the same sampling settings and seeds (``eval_config.json``: the data set's file or built-in
source, problem count, sampling, reward; the base seed and chunking); elsewhere the cell says
"not paired" and the note below the table says what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archer.eval.config import EvalConfig
from archer.eval.model import model_names
from archer.eval.records import SampleRecord, load_records
from archer.eval.results import per_problem_values
from archer.eval.runner import CONFIG_FILE, SAMPLES_FILE, evaluate
from archer.eval.stats import bootstrap_interval, mean

__all__ = ["TABLE_FILES", "evaluate_models", "compare_evals", "format_table", "write_table"]

TABLE_FILES = ("table.md", "table.png", "table.json")

_PAIRING_KEYS = ("seed", "chunk_seeds", "chunk_size", "prompt")
"""Settings of ``eval_config.json`` that must agree for samples to be paired (besides the data set's own)."""


def evaluate_models(config: EvalConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Evaluate each of ``config.model`` (``MODEL`` or ``NAME=MODEL``) into ``config.out/NAME`` with
    ``config``'s other settings, then write the comparison table into ``config.out``. Returns name ->
    that model's results."""
    models = model_names(config.model if isinstance(config.model, list) else [config.model])
    out = Path(config.out)
    results = {name: evaluate(replace(config, model=f"{name}={model}", out=str(out / name)))
               for name, model in models.items()}
    write_table({name: out / name for name in models}, out, num_resamples=config.num_bootstrap, seed=config.seed)
    return results


@dataclass
class _Eval:
    name: str
    results: dict[str, Any]
    settings: dict[str, Any]
    folder: Path
    records: list[SampleRecord] | None = None
    """``samples.jsonl``, read when a difference is first computed."""


def _load(name: str, folder: Path) -> _Eval:
    paths = [folder / "results.json", folder / CONFIG_FILE, folder / SAMPLES_FILE]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a finished eval of archer eval (missing {', '.join(missing)})")
    return _Eval(name, json.loads(paths[0].read_text()), json.loads(paths[1].read_text()), folder)


def _pairing_difference(base: _Eval, other: _Eval, benchmark: str) -> list[str]:
    """The settings in which ``other``'s eval of ``benchmark`` differs from ``base``'s (empty: paired)."""
    differ = [key for key in _PAIRING_KEYS if base.settings.get(key) != other.settings.get(key)]
    mine, theirs = base.settings["datasets"][benchmark], other.settings["datasets"][benchmark]
    return differ + sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))


def _per_problem(evaluation: _Eval, benchmark: str, keys: list[str]) -> dict[str, list[float]]:
    result = evaluation.results[benchmark]
    if evaluation.records is None:
        evaluation.records = load_records(evaluation.folder / SAMPLES_FILE)
    records = [r for r in evaluation.records if r.dataset == benchmark]
    ks = [int(key.removeprefix("pass@")) for key in keys if key.startswith("pass@")]
    values = per_problem_values(records, result["n"], ks, majority=False)
    return {key: values[key] for key in keys}


def compare_evals(evals: dict[str, str | Path], *, num_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The table's content from finished eval folders (name -> folder; the first is the baseline):
    ``{"models", "benchmarks", "baseline", "cells": {model: {benchmark: cell}}, "unpaired"}``. A cell
    holds ``n``, ``num_problems``, ``avg@n``, its ``ci95``, ``k`` (the largest), ``pass@k``, and for
    the other models ``delta`` — ``{"avg@n": Δ, "avg@n_ci95": [low, high], "pass@k": Δ, "pass@k_ci95":
    [...]}`` — or None where not paired (``unpaired[model][benchmark]`` lists the differing settings).
    Figures are fractions; a model without a benchmark has no cell for it."""
    if not evals:
        raise ValueError("no evals to compare")
    loaded = [_load(name, Path(folder)) for name, folder in evals.items()]
    base = loaded[0]
    benchmarks = list(dict.fromkeys(b for e in loaded for b in e.results))
    cells: dict[str, dict[str, Any]] = {}
    unpaired: dict[str, dict[str, list[str]]] = {}
    for evaluation in loaded:
        row = cells.setdefault(evaluation.name, {})
        for benchmark in benchmarks:
            result = evaluation.results.get(benchmark)
            if result is None:
                continue
            k = max(result["pass@k"], key=int)
            cell = {"n": result["n"], "num_problems": result["num_problems"], "avg@n": result["avg@n"],
                    "ci95": result["ci95"]["avg@n"], "k": int(k), "pass@k": result["pass@k"][k]}
            if evaluation is not base and benchmark in base.results:
                differ = _pairing_difference(base, evaluation, benchmark)
                if k not in base.results[benchmark]["pass@k"]:
                    differ.append(f"k (pass@{k} not in the baseline's eval)")
                if differ:
                    unpaired.setdefault(evaluation.name, {})[benchmark] = differ
                    cell["delta"] = None
                else:
                    keys = ["avg@n", f"pass@{k}"]
                    mine, theirs = _per_problem(base, benchmark, keys), _per_problem(evaluation, benchmark, keys)
                    delta: dict[str, Any] = {}
                    for key, shown in zip(keys, ("avg@n", "pass@k")):
                        differences = [b - a for a, b in zip(mine[key], theirs[key])]
                        delta[shown] = mean(differences)
                        delta[f"{shown}_ci95"] = list(bootstrap_interval(differences, num_resamples=num_resamples,
                                                                         seed=seed))
                    cell["delta"] = delta
            row[benchmark] = cell
    return {"models": [e.name for e in loaded], "benchmarks": benchmarks, "baseline": base.name, "cells": cells,
            "unpaired": unpaired, "builtin": {b: e.results[b]["benchmark"] for e in loaded for b in e.results
                                              if "benchmark" in e.results[b]}}


def _points(value: float, signed: bool = False) -> str:
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def format_table(table: dict[str, Any]) -> str:
    """``table.md``: the models' avg@n [95 % interval] and pass@k per benchmark, then the paired
    differences against the baseline, in percent (points)."""
    benchmarks, cells = table["benchmarks"], table["cells"]

    def first(benchmark: str) -> dict[str, Any]:  # the column's n and k: the first model's
        return next(cells[m][benchmark] for m in table["models"] if benchmark in cells[m])

    def header_of(benchmark: str, prefix: str = "") -> list[str]:
        return [f"{benchmark} {prefix}avg@{first(benchmark)['n']}", f"{benchmark} {prefix}pass@{first(benchmark)['k']}"]

    def _other(cell: dict[str, Any], benchmark: str, figure: str) -> str:
        """A cell whose n (or k) is not its column's says which it is (evals made separately)."""
        name = "avg" if figure == "n" else "pass"
        return "" if cell[figure] == first(benchmark)[figure] else f" ({name}@{cell[figure]})"

    header = ["model"] + [h for b in benchmarks for h in header_of(b)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in table["models"]:
        row = [model]
        for benchmark in benchmarks:
            cell = cells[model].get(benchmark)
            if cell is None:
                row += ["–", "–"]
            else:
                low, high = cell["ci95"]
                row += [f"{_points(cell['avg@n'])} [{_points(low)}, {_points(high)}]" + _other(cell, benchmark, "n"),
                        _points(cell["pass@k"]) + _other(cell, benchmark, "k")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "avg@n with its 95 % bootstrap interval over problems, pass@k unbiased; percent. Problems: "
              + ", ".join(f"{b} {next(cells[m][b]['num_problems'] for m in table['models'] if b in cells[m])}"
                          for b in benchmarks) + "."]
    others = table["models"][1:]
    if others:
        header = ["model"] + [h for b in benchmarks for h in header_of(b, "Δ")]
        lines += ["", f"Paired difference against {table['baseline']} (same problems, same sampling seeds): "
                  "the mean over problems of the per-problem difference, in points, with its 95 % bootstrap "
                  "interval over problems.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in others:
            row = [model]
            for benchmark in benchmarks:
                cell = cells[model].get(benchmark)
                delta = None if cell is None else cell.get("delta")
                if delta is None:
                    row += ["not paired" if cell is not None and benchmark in table["unpaired"].get(model, {})
                            else "–"] * 2
                    continue
                for key, figure in (("avg@n", "n"), ("pass@k", "k")):
                    low, high = delta[f"{key}_ci95"]
                    row.append(f"{_points(delta[key], True)} [{_points(low, True)}, {_points(high, True)}]"
                               + _other(cell, benchmark, figure))
            lines.append("| " + " | ".join(row) + " |")
    for model, benchmarks_differing in table["unpaired"].items():
        for benchmark, keys in benchmarks_differing.items():
            lines.append(f"\nNot paired: {model} on {benchmark} was evaluated with other settings than "
                         f"{table['baseline']} (differs in: {', '.join(keys)}).")
    if table["builtin"]:
        lines.append("\nBuilt-in benchmarks: " + "; ".join(f"{b}: {d}" for b, d in table["builtin"].items()) + ".")
    return "\n".join(lines) + "\n"


def _plot(table: dict[str, Any], path: Path) -> None:
    """Two panels: avg@n per benchmark with 95 % intervals (one bar per model), and the paired
    differences against the baseline with theirs."""
    # A Figure without pyplot: no backend is chosen, so importing archer.eval changes no notebook's plotting.
    from matplotlib.figure import Figure

    models, benchmarks, cells = table["models"], table["benchmarks"], table["cells"]
    others = models[1:]
    figure = Figure(figsize=(6 + 4 * bool(others), 4))
    axes = figure.subplots(1, 2 if others else 1, squeeze=False)
    width = 0.8 / len(models)

    def bars(axis: Any, names: list[str], value: Any, interval: Any) -> None:
        for j, model in enumerate(names):
            xs, ys, errors = [], [], [[], []]
            for i, benchmark in enumerate(benchmarks):
                cell = cells[model].get(benchmark)
                if cell is None or value(cell) is None:
                    continue
                y, (low, high) = 100 * value(cell), interval(cell)
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(y)
                errors[0].append(y - 100 * low)
                errors[1].append(100 * high - y)
            axis.bar(xs, ys, width, yerr=errors, capsize=3, label=model, color=f"C{models.index(model)}")
        axis.set_xticks(range(len(benchmarks)), benchmarks)
        axis.legend(fontsize=8)

    bars(axes[0][0], models, lambda c: c["avg@n"], lambda c: c["ci95"])
    axes[0][0].set_ylabel("avg@n (%)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][0].set_title("avg@n, 95 % interval over problems")
    if others:
        bars(axes[0][1], others, lambda c: None if c.get("delta") is None else c["delta"]["avg@n"],
             lambda c: c["delta"]["avg@n_ci95"])
        axes[0][1].axhline(0, color="black", linewidth=0.8)
        axes[0][1].set_ylabel(f"Δ avg@n vs {table['baseline']} (points)")
        axes[0][1].set_title("paired difference, 95 % interval")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_table(evals: dict[str, str | Path], out_dir: str | Path, *, num_resamples: int = 2000,
                seed: int = 0) -> tuple[Path, Path, Path]:
    """Write ``table.md``, ``table.png`` and ``table.json`` of :func:`compare_evals` into ``out_dir``."""
    table = compare_evals(evals, num_resamples=num_resamples, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png, js = (out_dir / name for name in TABLE_FILES)
    md.write_text(format_table(table), encoding="utf-8")
    _plot(table, png)
    js.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md, png, js
