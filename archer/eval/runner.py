"""``evaluate(config)``: sample n responses per problem, grade them, write samples and figures.

The run, per data set:

1. read and validate the rows (:func:`archer.data.read_rows`; ``builtin:NAME`` reads a built-in
   benchmark from its package, :mod:`archer.data.benchmarks`), render the prompts as training
   does (chat template, prompt template, system prompt; a completion prompt, ``raw_prompt``, as it
   is), and pick the domain (``code`` when the rows have tests, else ``math``), the reward
   (``MathReward`` / ``CodeReward``, ``CompletionCodeReward`` for completion prompts, unless one is
   given; a reward with ``check_data_sources`` — ``RoutedReward`` — must know every source) and
   the sampling (the paper's per domain unless overridden);
2. walk the problems in chunks of ``chunk_size``: each chunk is sampled in one call with a seed
   hashed from (seed, data set name, chunk index), graded in the reward worker processes, its
   reward errors and timeouts (responses scored 0) counted in ``reward_errors.json`` and its
   records appended to ``samples.jsonl``;
3. compute every figure from the records read back from ``samples.jsonl``
   (:func:`archer.eval.results.dataset_results`) and write ``results.json`` / ``results.md``, with
   each data set's ``reward_errors`` / ``reward_timeouts``; maj@k only where the reward extracts
   answers (math), elsewhere ``maj@k_omitted`` says why.

The model is a Hugging Face folder, a Lightning checkpoint file, or the folder an FSDP2
(``ModelParallelStrategy``) run saves; a checkpoint is exported to ``OUT/model`` first
(:mod:`archer.eval.model`). It is sampled through a training rollout engine
(:mod:`archer.eval.engines`), closed at the end, as are the reward worker processes, whether the
eval ends or fails.

Resume: ``OUT/eval_config.json`` holds what determines the samples (model, files, n, sampling,
seed, chunking, prompts, reward); a rerun with the same settings keeps the complete chunks of
``samples.jsonl``, drops a partial one, and samples only what is missing. Since each chunk's
seed is fixed, the final figures equal those of an uninterrupted run (exactly with HF on CPU).
A rerun with different settings is refused (use another ``--out``). Changing only ``k`` is
allowed: it needs no new samples. A checkpoint saved again since its export (same path, other
files) is exported again and the eval starts over, with a notice.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archer.data.benchmarks import RAW_PROMPT_KEY, benchmark_of, builtin_source, is_builtin
from archer.data.datamodule import render_row
from archer.data.rows import RowFields, read_rows
from archer.eval.config import PAPER_SAMPLING, EvalConfig
from archer.eval.engines import build_engine, resolve_engine
from archer.eval.model import model_label, parse_model, prepare_model
from archer.eval.records import SampleRecord, append_records, load_records, rewrite_records
from archer.eval.results import dataset_results, write_results
from archer.rewards import CodeReward, CompletionCodeReward, MathReward, Reward, RewardRunner
from archer.rollout import RolloutEngine, SamplingConfig
from archer.seeding import derive_seed

__all__ = ["evaluate", "chunk_seed"]

SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "eval_config.json"
REWARD_ERRORS_FILE = "reward_errors.json"
"""Per data set and chunk: reward errors and timeouts (their responses scored 0), first messages."""
SAMPLED_FILES = (CONFIG_FILE, SAMPLES_FILE, REWARD_ERRORS_FILE, "results.json", "results.md")
"""What an eval writes from its model: removed when the checkpoint changed since its export."""


def chunk_seed(seed: int, dataset: str, chunk: int) -> int:
    """The sampling seed of ``chunk`` of ``dataset``: a hash of (purpose, seed, data set, chunk)
    (:func:`archer.seeding.derive_seed`), so no two chunks, data sets or base seeds share a stream
    (sums of multiples collide), and a resumed eval gives a chunk the seed it had before."""
    return derive_seed("eval-chunk", seed, dataset, chunk)


@dataclass
class _Dataset:
    name: str
    file: str
    rows: list[dict]
    prompt_ids: list[list[int]]
    domain: str
    reward: Reward
    sampling: SamplingConfig
    builtin: str | None
    """What a built-in benchmark is and where it was read from (None for a file)."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(value: Any, _path: tuple[int, ...] = ()) -> Any:
    """A JSON-able description of a reward's settings (class and attributes, recursively).

    It is compared on resume, so it must not depend on the process: objects without a ``__dict__``
    (slots, ``re.Pattern``, ``Path``, C types) are described by their class and their ``repr``
    without memory addresses, and a reference cycle ends in the class name instead of recursing."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if id(value) in _path:
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "cycle": True}
    inner = (*_path, id(value))
    if isinstance(value, (list, tuple)):
        return [_describe(v, inner) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_describe(v, inner) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _describe(v, inner) for k, v in value.items()}
    cls = type(value)
    class_path = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"
    try:
        attributes = vars(value)
    except TypeError:  # no __dict__
        try:
            shown = _ADDRESS.sub("", repr(value))
        except Exception:  # noqa: BLE001 - a broken __repr__ must not stop the eval
            shown = None
        return {"class_path": class_path, "repr": shown}
    return {"class_path": class_path, "init_args": _describe(attributes, inner)}


def _domain(name: str, rows: list[dict], config: EvalConfig) -> str:
    if name in config.domains:
        return config.domains[name]
    with_tests = sum("tests" in row for row in rows)
    if 0 < with_tests < len(rows):
        raise ValueError(f"data set {name!r}: {with_tests} of {len(rows)} rows have tests; set its domain and a reward "
                         "(e.g. a RoutedReward) explicitly")
    return "code" if with_tests else "math"


def _default_reward(name: str, rows: list[dict], domain: str, rewards: dict[str, Reward]) -> Reward:
    """``MathReward`` for math, ``CodeReward`` for code, ``CompletionCodeReward`` for code rows that are
    completion prompts (``raw_prompt``: HumanEval); one object per kind, shared by the data sets."""
    if domain == "math":
        return rewards.setdefault("math", MathReward())
    completions = sum(bool(row.get(RAW_PROMPT_KEY)) for row in rows)
    if 0 < completions < len(rows):
        raise ValueError(f"data set {name!r}: {completions} of {len(rows)} rows are completion prompts "
                         f"({RAW_PROMPT_KEY}); give a reward explicitly")
    if completions:
        return rewards.setdefault("completion", CompletionCodeReward())
    return rewards.setdefault("code", CodeReward())


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
        reward = config.reward if config.reward is not None else _default_reward(name, rows, domain, default_rewards)
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
            render_row(row, tokenizer, apply_chat_template=config.apply_chat_template,
                       system_prompt=config.system_prompt, prompt_template=config.prompt_template)[1]
            for row in rows
        ]
        builtin = f"{benchmark_of(file).description} ({builtin_source(file)})" if is_builtin(file) else None
        datasets.append(_Dataset(name, file, rows, prompt_ids, domain, reward, sampling, builtin))
    return datasets


def _settings(config: EvalConfig, engine: str, datasets: list[_Dataset]) -> dict[str, Any]:
    """What determines the samples; a resumed eval must match it."""
    return {
        "model": str(Path(config.model).resolve()),
        "engine": engine,
        "seed": config.seed,
        "chunk_seeds": "derive_seed",  # how chunk seeds derive from `seed` (older evals used a sum)
        "chunk_size": config.chunk_size,
        "dtype": config.dtype,
        "hf_batch_size": config.hf_batch_size if engine == "hf" else None,
        "prompt": {"template": config.prompt_template, "system": config.system_prompt,
                   "chat_template": config.apply_chat_template},
        "datasets": {
            d.name: {"file": d.file if d.builtin else str(Path(d.file).resolve()), "num_problems": len(d.rows),
                     "domain": d.domain, "sampling": _describe(d.sampling), "reward": _describe(d.reward),
                     **({"builtin": d.builtin} if d.builtin else {})}
            for d in datasets
        },
    }


def _check_settings(out_dir: Path, settings: dict[str, Any], *, only_given: bool = False) -> None:
    """Refuse ``out_dir`` if it holds an eval whose recorded settings differ from ``settings`` (in
    the keys ``settings`` has, with ``only_given``); record them if it holds none (not with ``only_given``)."""
    path = out_dir / CONFIG_FILE
    if path.exists():
        before = json.loads(path.read_text())
        keys = settings.keys() if only_given else settings.keys() | before.keys()
        differ = sorted(key for key in keys if before.get(key) != settings.get(key))
        if differ:
            raise ValueError(f"{out_dir} holds samples of a different eval (differs in: {differ}); "
                             "use another --out, or remove it to start over")
    elif not only_given:
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


def _load_reward_errors(out_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    path = out_dir / REWARD_ERRORS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _save_reward_errors(out_dir: Path, errors: dict[str, dict[str, dict[str, Any]]]) -> None:
    path = out_dir / REWARD_ERRORS_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(errors, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)


def _sample_chunk(
    d: _Dataset, chunk: int, config: EvalConfig, engine: RolloutEngine, runner: RewardRunner, tokenizer: Any
) -> tuple[list[SampleRecord], dict[str, Any]]:
    """The chunk's records, and what went wrong grading it (errors, timeouts, first messages)."""
    start = chunk * config.chunk_size
    problems = range(start, min(start + config.chunk_size, len(d.rows)))
    sampling = SamplingConfig(**{**vars(d.sampling), "seed": chunk_seed(config.seed, d.name, chunk)})
    groups = engine.generate([d.prompt_ids[i] for i in problems], sampling)
    completions = [c for group in groups for c in group]
    rows = [d.rows[i] for i in problems for _ in range(config.n)]
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    graded = runner.score(texts, rows)
    messages = list(graded.errors)
    extract = getattr(d.reward, "extract_answer", None) if d.domain == "math" else None
    answers: list[str | None] = []
    extract_errors = 0
    for text, row in zip(texts, rows):
        try:
            answers.append(None if extract is None else extract(text, row))
        except Exception as error:  # noqa: BLE001 - a reward bug is reported, it does not end the eval
            answers.append(None)  # the response casts no vote
            extract_errors += 1
            if len(messages) < RewardRunner.MAX_KEPT_ERRORS:
                messages.append(f"extract_answer: {type(error).__name__}: {error}")
    report = {"errors": graded.num_errors, "timeouts": graded.num_timeouts, "extract_errors": extract_errors,
              "first_errors": messages}
    if graded.num_errors or graded.num_timeouts or extract_errors:
        print(f"[archer eval] {d.name} chunk {chunk}: {graded.num_errors} reward errors, {graded.num_timeouts} "
              f"timeouts (scored 0), {extract_errors} extract_answer errors (no vote), counted in results.json; "
              f"first: {messages[:1]}", file=sys.stderr)
    records = [
        SampleRecord(
            dataset=d.name, problem=problem, sample=j, response=text, answer=answer, score=float(score),
            length=len(completion.token_ids), truncated=completion.finish_reason == "length",
        )
        for (problem, j), text, answer, score, completion in zip(
            ((p, j) for p in problems for j in range(config.n)), texts, answers, graded.scores, completions
        )
    ]
    return records, report


def _grading_summary(d: _Dataset, errors: dict[str, dict[str, Any]], num_chunks: int) -> dict[str, Any]:
    """``reward_errors`` / ``reward_timeouts`` (responses scored 0) of a data set, ``extract_errors``
    (responses whose answer extraction raised: no maj@k vote) where it votes, None where a chunk's
    count is missing (``reward_errors.json`` removed); and why maj@k is missing where it is."""
    known = [errors.get(str(chunk)) for chunk in range(num_chunks)]

    def total(key: str) -> int | None:
        return None if None in known else sum(c[key] for c in known)

    summary: dict[str, Any] = {"reward_errors": total("errors"), "reward_timeouts": total("timeouts")}
    if _has_majority(d):
        summary["extract_errors"] = total("extract_errors")
    else:
        summary["maj@k_omitted"] = (
            "code data set: responses have no answer to vote on" if d.domain == "code"
            else f"{type(d.reward).__name__} extracts no answers (no extract_answer)"
        )
    return summary


def _has_majority(d: _Dataset) -> bool:
    """maj@k is defined where the reward extracts answers to vote on: math data sets whose reward has
    ``extract_answer``. Elsewhere it is left out (and the results say so) rather than reported as 0."""
    return d.domain == "math" and hasattr(d.reward, "extract_answer")


def evaluate(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Run (or resume) the eval of ``config``'s one model (``MODEL`` or ``NAME=MODEL``: NAME labels
    it in ``results.md``); write ``samples.jsonl``, ``results.json``, ``results.md`` under
    ``config.out`` and return the results."""
    from transformers import AutoTokenizer

    specs = config.model if isinstance(config.model, list) else [config.model]
    if len(specs) != 1:
        raise ValueError(f"evaluate takes one model, got {len(specs)}: use archer.eval.evaluate_models for several")
    name, model = parse_model(specs[0])
    config = replace(config, model=model)
    if not config.k:
        raise ValueError("k is empty: give at least one k for pass@k / maj@k (e.g. --k 1 or k: [1])")
    if config.n < 1:
        raise ValueError(f"n must be >= 1, got {config.n}")
    for k in config.k:
        if not 1 <= k <= config.n:
            raise ValueError(f"every k must lie in [1, n={config.n}] (pass@k and maj@k draw k of the n samples), "
                             f"got k={k}")
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {config.chunk_size}")
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An OUT of another model is refused before its export could be replaced by this model's.
    _check_settings(out_dir, {"model": str(Path(config.model).resolve())}, only_given=True)
    model_dir = prepare_model(config.model, out_dir, outputs=SAMPLED_FILES)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datasets = _load_datasets(config, tokenizer)
    engine_name = resolve_engine(config.engine)
    _check_settings(out_dir, _settings(config, engine_name, datasets))

    samples_path = out_dir / SAMPLES_FILE
    records = load_records(samples_path)
    done = _complete_chunks(records, datasets, config)
    kept = [r for r in records if (r.dataset, r.problem // config.chunk_size) in done]
    if len(kept) != len(records):  # a killed chunk: its samples are redone
        rewrite_records(samples_path, kept)
    todo = [(d, chunk) for d in datasets for chunk in range(-(-len(d.rows) // config.chunk_size))
            if (d.name, chunk) not in done]
    if todo:
        reward_errors = _load_reward_errors(out_dir)
        runners: dict[int, RewardRunner] = {}
        engine = None
        try:
            # Reward workers are forked before the engine starts its threads (see RewardRunner).
            for d in datasets:
                if id(d.reward) not in runners:
                    runners[id(d.reward)] = RewardRunner(d.reward, timeout_s=config.reward_timeout_s,
                                                         num_workers=config.reward_workers)
            engine = build_engine(engine_name, model_dir, tokenizer, dtype=config.dtype,
                                  hf_batch_size=config.hf_batch_size, vllm_kwargs=config.vllm,
                                  data_parallel_size=config.data_parallel_size)
            for d, chunk in todo:
                chunk_records, report = _sample_chunk(d, chunk, config, engine, runners[id(d.reward)], tokenizer)
                # Counted before the records are appended: a chunk on disk always has its count (a kill
                # in between leaves an incomplete chunk, redone, and its count rewritten).
                reward_errors.setdefault(d.name, {})[str(chunk)] = report
                _save_reward_errors(out_dir, reward_errors)
                append_records(samples_path, chunk_records)
                print(f"[archer eval] {d.name}: chunk {chunk + 1}/{-(-len(d.rows) // config.chunk_size)} done",
                      file=sys.stderr)
        finally:
            if engine is not None:
                engine.close()
            for runner in runners.values():
                runner.close()

    records = load_records(samples_path)
    reward_errors = _load_reward_errors(out_dir)
    results = {}
    for d in datasets:
        figures = dataset_results([r for r in records if r.dataset == d.name], config.n, sorted(set(config.k)),
                                  majority=_has_majority(d), num_resamples=config.num_bootstrap, seed=config.seed)
        grading = _grading_summary(d, reward_errors.get(d.name, {}), -(-len(d.rows) // config.chunk_size))
        builtin = {"benchmark": d.builtin} if d.builtin else {}
        results[d.name] = {**figures, **grading, "domain": d.domain, "file": d.file, **builtin,
                           "sampling": {"temperature": d.sampling.temperature, "top_p": d.sampling.top_p,
                                        "top_k": d.sampling.top_k, "max_new_tokens": d.sampling.max_new_tokens}}
    write_results(out_dir, results, name or model_label(model))
    return results
