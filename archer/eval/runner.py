"""``evaluate(config)``: sample n responses per problem, grade them, write samples and figures.

The run, per data set:

1. read and validate the rows (:func:`archer.data.read_rows`), render the prompts as training
   does (chat template, prompt template, system prompt), and pick the domain (``code`` when the
   rows have tests, else ``math``), the reward (``MathReward`` / ``CodeReward`` unless one is
   given; a reward with ``check_data_sources`` — ``RoutedReward`` — must know every source) and
   the sampling (the paper's per domain unless overridden);
2. walk the problems in chunks of ``chunk_size``: each chunk is sampled in one call with a seed
   derived from (seed, data set name, chunk index), graded in the reward worker processes, and
   its records appended to ``samples.jsonl``;
3. compute every figure from the records read back from ``samples.jsonl``
   (:func:`archer.eval.results.dataset_results`) and write ``results.json`` / ``results.md``.

Resume: ``OUT/eval_config.json`` holds what determines the samples (model, files, n, sampling,
seed, chunking, prompts, reward); a rerun with the same settings keeps the complete chunks of
``samples.jsonl``, drops a partial one, and samples only what is missing. Since each chunk's
seed is fixed, the final figures equal those of an uninterrupted run (exactly with HF on CPU).
A rerun with different settings is refused (use another ``--out``). Changing only ``k`` is
allowed: it needs no new samples.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archer.data.datamodule import render_prompt
from archer.data.rows import RowFields, read_rows
from archer.eval.config import PAPER_SAMPLING, EvalConfig
from archer.eval.engines import Sampler, build_sampler, resolve_engine
from archer.eval.records import SampleRecord, append_records, load_records, rewrite_records
from archer.eval.results import dataset_results, write_results
from archer.rewards import CodeReward, MathReward, Reward, RewardRunner
from archer.rollout import SamplingConfig

__all__ = ["evaluate", "prepare_model", "chunk_seed"]

SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "eval_config.json"


def chunk_seed(seed: int, dataset: str, chunk: int) -> int:
    """The sampling seed of ``chunk`` of ``dataset`` (independent of the other data sets and chunks)."""
    return (seed * 1_000_003 + zlib.crc32(dataset.encode()) + 7919 * chunk) % 2**31


def prepare_model(model: str, out_dir: Path) -> Path:
    """The HF folder to sample from: ``model`` itself, or a ``.ckpt`` exported to ``OUT/model``."""
    path = Path(model)
    if path.is_file():
        from archer.export import export_checkpoint

        target = out_dir / "model"
        if not (target / "config.json").is_file():
            export_checkpoint(path, target)
        return target
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model}: neither a Hugging Face model folder (config.json) nor a checkpoint file")
    return path


@dataclass
class _Dataset:
    name: str
    file: str
    rows: list[dict]
    prompt_ids: list[list[int]]
    domain: str
    reward: Reward
    sampling: SamplingConfig


def _describe(value: Any) -> Any:
    """A JSON-able description of a reward's settings (class and attributes, recursively)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    cls = type(value)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _describe(vars(value))}


def _domain(name: str, rows: list[dict], config: EvalConfig) -> str:
    if name in config.domains:
        return config.domains[name]
    with_tests = sum("tests" in row for row in rows)
    if 0 < with_tests < len(rows):
        raise ValueError(f"data set {name!r}: {with_tests} of {len(rows)} rows have tests; set its domain and a reward "
                         "(e.g. a RoutedReward) explicitly")
    return "code" if with_tests else "math"


def _load_datasets(config: EvalConfig, tokenizer: Any) -> list[_Dataset]:
    fields = RowFields(prompt=config.prompt_key, answer=config.answer_key, tests=config.tests_key,
                       data_source=config.data_source_key)
    default_rewards: dict[str, Reward] = {}
    datasets = []
    for name, file in config.data.items():
        rows = read_rows(file, fields).rows
        if not rows:
            raise ValueError(f"data set {name!r} ({file}) has no rows")
        domain = _domain(name, rows, config)
        reward = config.reward
        if reward is None:
            reward = default_rewards.setdefault(domain, MathReward() if domain == "math" else CodeReward())
        check = getattr(reward, "check_data_sources", None)
        if check is not None:
            check(row["data_source"] for row in rows)
        temperature, top_p = PAPER_SAMPLING[domain]
        sampling = SamplingConfig(
            n=config.n,
            temperature=temperature if config.temperature is None else config.temperature,
            top_p=top_p if config.top_p is None else config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
        )
        prompt_ids = [
            render_prompt(row["prompt"], tokenizer, apply_chat_template=config.apply_chat_template,
                          system_prompt=config.system_prompt, prompt_template=config.prompt_template)[1]
            for row in rows
        ]
        datasets.append(_Dataset(name, file, rows, prompt_ids, domain, reward, sampling))
    return datasets


def _settings(config: EvalConfig, engine: str, datasets: list[_Dataset]) -> dict[str, Any]:
    """What determines the samples; a resumed eval must match it."""
    return {
        "model": str(Path(config.model).resolve()),
        "engine": engine,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
        "dtype": config.dtype,
        "hf_batch_size": config.hf_batch_size if engine == "hf" else None,
        "prompt": {"template": config.prompt_template, "system": config.system_prompt,
                   "chat_template": config.apply_chat_template},
        "datasets": {
            d.name: {"file": str(Path(d.file).resolve()), "num_problems": len(d.rows), "domain": d.domain,
                     "sampling": _describe(d.sampling), "reward": _describe(d.reward)}
            for d in datasets
        },
    }


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / CONFIG_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            differ = sorted(key for key in settings.keys() | before.keys() if before.get(key) != settings.get(key))
            raise ValueError(f"{out_dir} holds samples of a different eval (differs in: {differ}); "
                             "use another --out, or remove it to start over")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _complete_chunks(records: list[SampleRecord], datasets: list[_Dataset], config: EvalConfig) -> set[tuple[str, int]]:
    """``(data set, chunk)`` pairs all of whose samples are on disk."""
    counts: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.dataset, record.problem // config.chunk_size)
        counts[key] = counts.get(key, 0) + 1
    done = set()
    for d in datasets:
        for chunk, start in enumerate(range(0, len(d.rows), config.chunk_size)):
            expected = min(config.chunk_size, len(d.rows) - start) * config.n
            if counts.get((d.name, chunk), 0) == expected:
                done.add((d.name, chunk))
    return done


def _sample_chunk(
    d: _Dataset, chunk: int, config: EvalConfig, sampler: Sampler, runner: RewardRunner, tokenizer: Any
) -> list[SampleRecord]:
    start = chunk * config.chunk_size
    problems = range(start, min(start + config.chunk_size, len(d.rows)))
    sampling = SamplingConfig(**{**vars(d.sampling), "seed": chunk_seed(config.seed, d.name, chunk)})
    groups = sampler.generate([d.prompt_ids[i] for i in problems], sampling)
    completions = [c for group in groups for c in group]
    rows = [d.rows[i] for i in problems for _ in range(config.n)]
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    graded = runner.score(texts, rows)
    if graded.num_errors or graded.num_timeouts:
        print(f"[archer eval] {d.name} chunk {chunk}: {graded.num_errors} reward errors, {graded.num_timeouts} "
              f"timeouts (scored 0); first: {graded.errors[:1]}", file=sys.stderr)
    extract = getattr(d.reward, "extract_answer", None) if d.domain == "math" else None
    return [
        SampleRecord(
            dataset=d.name, problem=problem, sample=j, response=text,
            answer=None if extract is None else extract(text, row), score=float(score),
            length=len(completion.token_ids), truncated=completion.finish_reason == "length",
        )
        for (problem, j), text, row, score, completion in zip(
            ((p, j) for p in problems for j in range(config.n)), texts, rows, graded.scores, completions
        )
    ]


def evaluate(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Run (or resume) the eval of ``config``; write ``samples.jsonl``, ``results.json``,
    ``results.md`` under ``config.out`` and return the results."""
    from transformers import AutoTokenizer

    for k in config.k:
        if not 1 <= k <= config.n:
            raise ValueError(f"every k must lie in [1, n={config.n}], got k={k}")
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {config.chunk_size}")
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(config.model, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datasets = _load_datasets(config, tokenizer)
    engine = resolve_engine(config.engine)
    _check_settings(out_dir, _settings(config, engine, datasets))

    samples_path = out_dir / SAMPLES_FILE
    records = load_records(samples_path)
    done = _complete_chunks(records, datasets, config)
    kept = [r for r in records if (r.dataset, r.problem // config.chunk_size) in done]
    if len(kept) != len(records):  # a killed chunk: its samples are redone
        rewrite_records(samples_path, kept)
    todo = [(d, chunk) for d in datasets for chunk in range(-(-len(d.rows) // config.chunk_size))
            if (d.name, chunk) not in done]
    if todo:
        # Reward workers are forked before the engine starts its threads (see RewardRunner).
        runners = {id(d.reward): RewardRunner(d.reward, timeout_s=config.reward_timeout_s,
                                              num_workers=config.reward_workers) for d in datasets}
        sampler = build_sampler(engine, model_dir, tokenizer, dtype=config.dtype, hf_batch_size=config.hf_batch_size,
                                vllm_kwargs=config.vllm, data_parallel_size=config.data_parallel_size)
        try:
            for d, chunk in todo:
                append_records(samples_path, _sample_chunk(d, chunk, config, sampler, runners[id(d.reward)], tokenizer))
                print(f"[archer eval] {d.name}: chunk {chunk + 1}/{-(-len(d.rows) // config.chunk_size)} done",
                      file=sys.stderr)
        finally:
            sampler.close()
            for runner in runners.values():
                runner.close()

    records = load_records(samples_path)
    results = {}
    for d in datasets:
        figures = dataset_results([r for r in records if r.dataset == d.name], config.n, sorted(set(config.k)),
                                  majority=d.domain == "math" and hasattr(d.reward, "extract_answer"),
                                  num_resamples=config.num_bootstrap, seed=config.seed)
        results[d.name] = {**figures, "domain": d.domain, "file": d.file,
                           "sampling": {"temperature": d.sampling.temperature, "top_p": d.sampling.top_p,
                                        "top_k": d.sampling.top_k, "max_new_tokens": d.sampling.max_new_tokens}}
    write_results(out_dir, results, Path(config.model).name)
    return results
