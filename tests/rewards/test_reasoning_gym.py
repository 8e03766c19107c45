"""reasoning-gym as a task and a reward: rows are the library's own items, and the reward's scores
are the library's own ``score_answer`` on them, in-process and in the reward workers. Skipped,
saying why, without the package (``bash install.sh evals``; CI installs it)."""

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("reasoning_gym") is None:
    pytest.skip("reasoning-gym is not installed (bash install.sh evals; CI installs it)", allow_module_level=True)

import reasoning_gym
from reasoning_gym.utils import extract_answer

from archer.data.tasks import ReasoningGymTask
from archer.rewards import MathReward, ReasoningGymReward, RewardRunner, RoutedReward

# Families with their own scorers of different kinds: numeric (chain_sum), per-character partial credit
# (spell_backward), scorers that read the data set's config (letter_jumble, propositional_logic,
# time_intervals), the default exact / contained-in scorer (gcd).
FAMILIES = [
    {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 3, "max_digits": 2}},
    {"name": "spell_backward", "config": {"min_word_len": 3, "max_word_len": 5}},
    {"name": "letter_jumble"},
    {"name": "propositional_logic"},
    {"name": "time_intervals"},
    {"name": "gcd", "weight": 2.0, "config": {"max_value": 50}},
]


def _responses(entry: dict) -> list[str]:
    answer = entry["answer"] if isinstance(entry["answer"], str) else ""
    return [f"<think>hmm</think><answer>{answer}</answer>", f"<answer> {answer} </answer>",
            f"<answer>{answer}x</answer>", f"<answer>{answer[::-1]}</answer>", "<answer>12</answer>", answer, "",
            f"I say {answer}"]


def test_rows_are_the_librarys_items_and_scores_its_score_answer():
    task = ReasoningGymTask(FAMILIES)
    rows = task.rows(60, seed=3)
    seen = set()
    for index, row in enumerate(rows):
        spec = row["reasoning_gym"]
        family = next(f for f in FAMILIES if f["name"] == spec["dataset"])
        # The library's own data set and item, generated here from the row's recorded seed and config.
        library = reasoning_gym.create_dataset(spec["dataset"], seed=spec["seed"], size=60, **family.get("config", {}))
        entry = library[index]
        assert (row["prompt"], row["answer"]) == (entry["question"], entry["answer"])
        assert row["metadata"] == entry["metadata"]
        assert row["data_source"] == "reasoning_gym" and spec["config"] == family.get("config", {})
        for response in _responses(entry):
            text = response.split("</think>")[-1]
            assert task(response, row) == float(library.score_answer(extract_answer(text), entry)), (spec, response)
        seen.add(spec["dataset"])
        # the reference answer scores 1 (propositional_logic has none: any valid conclusion counts)
        if entry["answer"] is not None:
            assert task(f"<answer>{entry['answer']}</answer>", row) == 1.0
    assert seen == {f["name"] for f in FAMILIES}


def test_without_an_answer_tag_the_whole_response_is_the_answer():
    task = ReasoningGymTask([{"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1}}],
                            answer_tag=None)
    (row,) = task.rows(1, seed=0)
    library = reasoning_gym.create_dataset("chain_sum", seed=row["reasoning_gym"]["seed"], size=1,
                                           min_terms=2, max_terms=2, max_digits=1)
    answer = row["answer"]
    for response in (answer, f" {answer}\n", f"{answer}0", f"<answer>{answer}</answer>"):
        assert task(response, row) == library.score_answer(response.strip(), library[0])
    assert task(f" {answer}\n", row) == 1.0 and 0.0 < task(f"{answer}abc", row) < 1.0  # the scorer's partial credit


def test_families_are_mixed_by_weight_and_rows_depend_only_on_num_and_seed():
    task = ReasoningGymTask([{"name": "gcd", "weight": 3}, "chain_sum"])
    rows = task.rows(400, seed=7)
    share = sum(row["reasoning_gym"]["dataset"] == "gcd" for row in rows) / len(rows)
    assert 0.65 < share < 0.85  # 3 : 1 is 0.75; the binomial's standard deviation over 400 rows is 0.022
    assert task.rows(400, seed=7) == rows and task.rows(300, seed=7) == rows[:300]
    assert task.rows(50, seed=8) != rows[:50]


def test_scored_in_reward_workers_and_routed_by_data_source():
    """Rows and reward cross the worker processes' pipes (the scorer's data set is rebuilt there)."""
    task = ReasoningGymTask(FAMILIES[:2])
    rows = task.rows(12, seed=1)
    responses = [f"<answer>{row['answer']}</answer>" if i % 2 else "<answer>0</answer>" for i, row in enumerate(rows)]
    routed = RoutedReward({"reasoning_gym": ReasoningGymReward(), "aime*": MathReward()})
    runner = RewardRunner(routed, timeout_s=60.0, num_workers=2)
    try:
        graded = runner.score(responses, rows)
    finally:
        runner.close()
    assert graded.num_errors == 0, graded.errors
    assert graded.scores == [task(response, row) for response, row in zip(responses, rows)]
    assert graded.scores[1::2] == [1.0] * 6


@pytest.mark.parametrize("datasets, message", [
    ([], "needs at least one data set"),
    (["no_such_family"], "no reasoning-gym data set 'no_such_family'"),
    ([{"name": "gcd", "config": {"max_valu": 9}}], "data set 'gcd': bad config"),
    ([{"name": "gcd", "config": {"seed": 1}}], "config sets seed/size, which come from data.seed"),
    ([{"name": "gcd", "weight": 0}], "weight must be > 0"),
    (["gcd", "gcd"], "a data set is listed twice"),
    ([{"name": "gcd", "weigth": 2}], "expected a name or {name, weight, config}"),
])
def test_bad_settings_are_refused_at_construction(datasets, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        ReasoningGymTask(datasets)


def test_a_row_from_elsewhere_is_refused_naming_the_keys():
    with pytest.raises(KeyError, match=r"ReasoningGymReward needs row\['reasoning_gym'\]"):
        ReasoningGymReward()("<answer>1</answer>", {"prompt": "1+0=", "answer": "1"})


def test_the_reasoning_gym_quickstart_trains_and_validates(tmp_path, tiny_model_dir, monkeypatch):
    """``configs/reasoning_gym_quickstart.yaml`` for 4 RL steps (its full 300-step curve is in docs/evaluation.md)."""
    import pandas as pd

    from archer.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "reasoning_gym_quickstart.yaml"
    main(["fit", "--config", str(config), f"--model.model_path={tiny_model_dir}", "--trainer.max_steps=4",
          "--trainer.val_check_interval=4", "--data.train_size=64", "--data.val_size=8"])
    metrics = pd.read_csv(next((tmp_path / "runs" / "reasoning_gym_quickstart").glob("csv/version_*/metrics.csv")))
    rewards = metrics["train/reward_mean"].dropna()
    assert len(rewards) == 4 and rewards.between(0, 1).all()
    assert metrics["val/reasoning_gym/pass@1"].dropna().between(0, 1).all()
    assert len(metrics["val/reasoning_gym/pass@1"].dropna()) == 1


def test_the_yaml_of_docs_evaluation_builds_the_task_it_describes():
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL) if "ReasoningGymTask" in b]
    data = yaml.safe_load(block)["data"]
    assert data["task"]["class_path"] == "archer.data.tasks.ReasoningGymTask"
    task = ReasoningGymTask(**data["task"]["init_args"])
    rows = task.rows(30, seed=0)
    assert {row["reasoning_gym"]["dataset"] for row in rows} == {"chain_sum", "gcd"}
    assert all(task(f"<answer>{row['answer']}</answer>", row) == 1.0 for row in rows)
