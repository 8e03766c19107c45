"""``EvalConfig``: everything ``archer eval`` is told, as one typed object (the YAML schema too).

The paper's sampling per domain (arXiv 2507.15778, evaluation setup) is the default: math
temperature 0.6, top-p 0.95; code temperature 0.8, top-p 0.95. ``temperature`` / ``top_p`` given
explicitly override it for every data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from archer.rewards.base import Reward

__all__ = ["Domain", "PAPER_SAMPLING", "EvalConfig"]

Domain = Literal["math", "code"]

PAPER_SAMPLING: dict[str, tuple[float, float]] = {"math": (0.6, 0.95), "code": (0.8, 0.95)}
"""Domain -> (temperature, top_p) of the paper's evaluation."""


@dataclass
class EvalConfig:
    """What to evaluate, how to sample and grade it, and where the results go."""

    model: str | list[str]
    """A Hugging Face model folder, or an Archer Lightning checkpoint (a ``.ckpt`` file, or the folder
    FSDP2's ``ModelParallelStrategy`` saves), exported to ``OUT/model`` first. Several (a list, each
    ``MODEL`` or ``NAME=MODEL``): each is evaluated into ``OUT/NAME`` and the models are compared in
    one table (:func:`archer.eval.evaluate_models`)."""
    data: dict[str, str]
    """Benchmarks, name -> data file (any format ``archer data`` reads) or a built-in benchmark,
    ``builtin:NAME`` (``aime24``, ``aime25``, ``cnmo``, ``math500``, ``humaneval``; :mod:`archer.data.benchmarks`)."""
    out: str
    """Output folder: ``samples.jsonl``, ``results.json``, ``results.md`` (an existing one is resumed);
    with several models one such folder per model and ``table.md``, ``table.png``, ``table.json``."""
    n: int = 16
    """Samples per problem (avg@n)."""
    k: list[int] = field(default_factory=lambda: [1])
    """The k of pass@k and maj@k: at least one, each in [1, n]."""
    temperature: float | None = None
    """Sampling temperature; None: the paper's per domain (math 0.6, code 0.8)."""
    top_p: float | None = None
    """Nucleus mass; None: the paper's (0.95)."""
    top_k: int = -1
    """Top-k cutoff; -1 disables it."""
    max_new_tokens: int = 32768
    """Longest response in tokens (the paper: 32k)."""
    seed: int = 0
    """Base seed: each chunk of problems is sampled with a seed derived from it, the data set
    name and the chunk index, so a resumed eval samples exactly what an uninterrupted one would."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """``auto``: vLLM when it is installed, else Hugging Face ``generate``."""
    domains: dict[str, Domain] = field(default_factory=dict)
    """Data set name -> domain; default: ``code`` when its rows have tests, else ``math``."""
    reward: Reward | None = None
    """Reward for every data set (e.g. a ``RoutedReward``); None: ``MathReward`` for math data
    sets, ``CodeReward`` for code ones."""
    prompt_key: str = "prompt"
    """Field (dotted path) holding the prompt."""
    answer_key: str = "answer"
    """Field holding the reference answer (verl: ``reward_model.ground_truth``)."""
    tests_key: str = "tests"
    """Field(s) holding code tests, comma-separated."""
    data_source_key: str = "data_source"
    """Field naming each row's source (routing)."""
    prompt_template: str | None = None
    """Text around each problem with one ``{prompt}`` (e.g. the R1 "Please reason step by step…")."""
    system_prompt: str | None = None
    """System message put before chat prompts that have none."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template."""
    chunk_size: int = 32
    """Problems per generation call; the unit of resuming (a killed chunk is redone)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype (``auto``: bfloat16 on GPU, float32 on CPU)."""
    hf_batch_size: int | None = None
    """HF engine: sequences per ``generate`` call within a chunk (None: the whole chunk)."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``archer.rollout.VLLMEngine`` (``max_model_len``, ``kv_cache_memory_bytes``,
    ``gpu_memory_utilization``, ...)."""
    data_parallel_size: int | None = None
    """vLLM engines, one process each (one GPU each); None: the number of visible GPUs (1 on CPU)."""
    reward_workers: int = 2
    """Reward worker processes."""
    reward_timeout_s: float = 60.0
    """Limit per response for the reward (code runs several tests); past it the score is 0."""
    num_bootstrap: int = 2000
    """Bootstrap resamples for the 95 % intervals."""
