"""From ``samples.jsonl`` records to ``results.json`` and the paper-style ``results.md``.

A response is correct when its score is >= 1 (the verifiable rewards are 0/1; with
``CodeReward(mode="fraction")`` only a full pass counts). A response the reward failed to grade
(it raised, returned no number, or timed out) scores 0; :func:`archer.eval.evaluate` adds each
data set's counts (``reward_errors``, ``reward_timeouts``; ``extract_errors``: responses whose
answer extraction raised and so cast no maj@k vote) and, where maj@k is not defined (no extracted
answers: code), ``maj@k_omitted`` with the reason; ``results.md`` states both. Every figure is a
mean over problems of the per-problem values of :mod:`archer.eval.stats`, with a 95 % bootstrap
interval over problems under ``"ci95"``. ``results.json`` holds fractions; ``results.md`` shows
percentages, as the paper's tables do.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from archer.eval.records import SampleRecord
from archer.eval.stats import bootstrap_interval, maj_at_k, mean, pass_at_k_of

__all__ = ["per_problem_values", "dataset_results", "write_results", "format_markdown"]


def _by_problem(records: list[SampleRecord], n: int) -> list[list[SampleRecord]]:
    groups: dict[int, list[SampleRecord]] = defaultdict(list)
    for record in records:
        groups[record.problem].append(record)
    problems = []
    for index in sorted(groups):
        samples = sorted(groups[index], key=lambda r: r.sample)
        if [r.sample for r in samples] != list(range(n)):
            raise ValueError(f"problem {index} has samples {[r.sample for r in samples]}, expected 0..{n - 1}")
        problems.append(samples)
    if not problems:
        raise ValueError("no samples")
    return problems


def per_problem_values(records: list[SampleRecord], n: int, ks: list[int], *, majority: bool) -> dict[str, list[float]]:
    """Each figure's value per problem, in problem order: ``avg@n``, ``mean_length``,
    ``truncation_rate``, ``pass@<k>`` and (with ``majority``) ``maj@<k>`` for every k of ``ks``
    (every problem must have samples ``0..n-1``)."""
    problems = _by_problem(records, n)
    correct = [[r.score >= 1.0 for r in samples] for samples in problems]
    per_problem: dict[str, list[float]] = {
        "avg@n": [mean([float(c) for c in flags]) for flags in correct],
        "mean_length": [mean([float(r.length) for r in samples]) for samples in problems],
        "truncation_rate": [mean([float(r.truncated) for r in samples]) for samples in problems],
    }
    for k in ks:
        per_problem[f"pass@{k}"] = [pass_at_k_of(sum(flags), n, k) for flags in correct]
        if majority:
            per_problem[f"maj@{k}"] = [
                maj_at_k([r.answer for r in samples], flags, k) for samples, flags in zip(problems, correct)
            ]
    return per_problem


def dataset_results(
    records: list[SampleRecord], n: int, ks: list[int], *, majority: bool, num_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The figures of one data set from its records (every problem must have samples ``0..n-1``).

    Args:
        records: the data set's sample records.
        n: samples per problem.
        ks: the k of pass@k (and maj@k), each ``<= n``.
        majority: compute maj@k (math: the reward extracts answers).
        num_resamples: bootstrap resamples for the intervals.
        seed: bootstrap seed.
    """
    per_problem = per_problem_values(records, n, ks, majority=majority)
    value = {name: mean(values) for name, values in per_problem.items()}
    interval = {
        name: list(bootstrap_interval(values, num_resamples=num_resamples, seed=seed))
        for name, values in per_problem.items()
    }

    def grouped(source: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {name: source[name] for name in ("avg@n", "mean_length", "truncation_rate")}
        out["pass@k"] = {str(k): source[f"pass@{k}"] for k in ks}
        if majority:
            out["maj@k"] = {str(k): source[f"maj@{k}"] for k in ks}
        return out

    return {"n": n, "num_problems": len(per_problem["avg@n"]), **grouped(value), "ci95": grouped(interval)}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_markdown(results: dict[str, dict[str, Any]], model: str) -> str:
    """The paper-style table (avg@n and the largest pass@k per benchmark, in %), then every figure
    with its 95 % interval."""
    names = list(results)
    header = ["model"] + [f"{name} avg@{results[name]['n']}" for name in names]
    header += [f"{name} pass@{max(results[name]['pass@k'], key=int)}" for name in names]
    row = [model] + [_percent(results[name]["avg@n"]) for name in names]
    row += [_percent(results[name]["pass@k"][max(results[name]["pass@k"], key=int)]) for name in names]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(row) + " |",
        "",
        "| benchmark | metric | value | 95% CI |",
        "|---|---|---|---|",
    ]
    for name in names:
        result, interval = results[name], results[name]["ci95"]
        entries = [(f"avg@{result['n']}", result["avg@n"], interval["avg@n"], True)]
        for family in ("pass@k", "maj@k"):
            for k, value in result.get(family, {}).items():
                entries.append((family.replace("k", k), value, interval[family][k], True))
        entries.append(("mean length (tokens)", result["mean_length"], interval["mean_length"], False))
        entries.append(("truncated", result["truncation_rate"], interval["truncation_rate"], True))
        for metric, value, (low, high), as_percent in entries:
            shown = (_percent(value), f"[{_percent(low)}, {_percent(high)}]") if as_percent else (
                f"{value:.1f}", f"[{low:.1f}, {high:.1f}]")
            lines.append(f"| {name} | {metric} | {shown[0]} | {shown[1]} |")
    lines.append("")
    lines.append("Problems per benchmark: " + ", ".join(f"{name} {results[name]['num_problems']}" for name in names)
                 + ". Percentages; intervals are 95 % bootstrap intervals over problems.")
    graded = [name for name in names if "reward_errors" in results[name]]
    if graded:  # responses the reward could not grade count as wrong: say how many there were
        counts = ", ".join(f"{name} {_count(results[name]['reward_errors'])} errors / "
                           f"{_count(results[name].get('reward_timeouts'))} timeouts" for name in graded)
        lines.append(f"Responses the reward failed to grade (scored 0): {counts}.")
    extract = [name for name in names if results[name].get("extract_errors")]
    if extract:
        counts = ", ".join(f"{name} {results[name]['extract_errors']}" for name in extract)
        lines.append(f"Responses whose answer extraction failed (no maj@k vote): {counts}.")
    builtin = [f"{name}: {results[name]['benchmark']}" for name in names if "benchmark" in results[name]]
    if builtin:  # what a built-in name stands for (AIME 2025 is part I only, MATH-500 a subset)
        lines.append("Built-in benchmarks: " + "; ".join(builtin) + ".")
    omitted = [f"{name} ({results[name]['maj@k_omitted']})" for name in names if "maj@k_omitted" in results[name]]
    if omitted:
        lines.append("maj@k not reported for: " + "; ".join(omitted) + ".")
    return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def write_results(out_dir: str | Path, results: dict[str, dict[str, Any]], model: str) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(format_markdown(results, model))
    return json_path, md_path
