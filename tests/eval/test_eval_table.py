"""``archer eval A=MODEL_A B=MODEL_B ...``: one eval per model and one table of them, with paired
differences against the first model recomputed here from the samples."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer.cli import main
from archer.eval import write_table
from archer.eval.model import model_names

FLAGS = ["--engine", "hf", "--max-new-tokens", "1", "--reward-workers", "1", "--n", "8", "--k", "1", "8",
         "--temperature", "1.0"]


@pytest.fixture(scope="module")
def math_file(tmp_path_factory):
    """Twelve sums with one-digit answers, answered in one token (by chance, for a tiny model): rows of our own."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (2, 3), (3, 4), (1, 5), (2, 6), (4, 4))]
    rows += [{"prompt": f"{a}*1=", "answer": str(a)} for a in range(1, 7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _digit_model(source: str, target: Path) -> Path:
    """The tiny model with an output layer that writes digits and spaces: their rows all point along
    the mean direction of its last hidden states, so their logits are large and equal. It answers the
    sums right now and then (the last number of a response is its answer), where the random model
    hardly ever does, so the two differ from problem to problem."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "0123456789 "]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}], tokenize=False,
                                         add_generation_prompt=True)
    with torch.no_grad():
        hidden = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False),
                       output_hidden_states=True).hidden_states[-1][0]
        direction = hidden.mean(0) / hidden.mean(0).norm()
        model.lm_head.weight[ids] = 10 * direction
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def compared(tiny_model_dir, math_file, tmp_path_factory):
    other = _digit_model(tiny_model_dir, tmp_path_factory.mktemp("other"))
    out = tmp_path_factory.mktemp("compare") / "table"
    main(["eval", f"base={tiny_model_dir}", f"other={other}", f"again={tiny_model_dir}",
          "--data", f"sums={math_file}", "--out", str(out), *FLAGS])
    return out


def _per_problem_avg(folder: Path) -> list[float]:
    correct = defaultdict(list)
    for line in (folder / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        correct[record["problem"]].append(record["score"] >= 1)
    return [float(np.mean(correct[p])) for p in sorted(correct)]


def test_each_model_is_a_complete_eval_and_the_table_has_a_row_each(compared):
    for name in ("base", "other", "again"):
        results = json.loads((compared / name / "results.json").read_text())
        assert results["sums"]["num_problems"] == 12 and results["sums"]["n"] == 8
        assert (compared / name / "results.md").read_text().splitlines()[2].startswith(f"| {name} |")
    table = (compared / "table.md").read_text()
    assert table.startswith("| model | sums avg@8 | sums pass@8 |\n")
    for name in ("base", "other", "again"):
        avg = json.loads((compared / name / "results.json").read_text())["sums"]["avg@n"]
        assert f"| {name} | {100 * avg:.1f} [" in table
    assert "Paired difference against base" in table and "| other | " in table.split("Paired difference")[1]
    assert (compared / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_difference_is_the_mean_per_problem_difference(compared):
    table = json.loads((compared / "table.json").read_text())
    assert table["models"] == ["base", "other", "again"] and table["baseline"] == "base"
    base = _per_problem_avg(compared / "base")
    other = _per_problem_avg(compared / "other")
    delta = table["cells"]["other"]["sums"]["delta"]
    assert len(set(np.subtract(other, base))) > 1  # the models differ by more on some problems than on others
    assert delta["avg@n"] == pytest.approx(np.mean(np.subtract(other, base)), abs=1e-12)
    low, high = delta["avg@n_ci95"]
    assert low <= delta["avg@n"] <= high
    # pass@8 of 8 samples is "any correct"
    any_other = [float(v > 0) for v in other]
    any_base = [float(v > 0) for v in base]
    assert delta["pass@k"] == pytest.approx(np.mean(np.subtract(any_other, any_base)), abs=1e-12)
    # the same model sampled with the same seeds: the same samples, a difference of exactly 0
    assert table["cells"]["again"]["sums"]["delta"] == {"avg@n": 0.0, "avg@n_ci95": [0.0, 0.0], "pass@k": 0.0,
                                                        "pass@k_ci95": [0.0, 0.0]}
    assert "base" not in table["unpaired"] and "delta" not in table["cells"]["base"]["sums"]


def test_a_rerun_reuses_every_eval(compared, tiny_model_dir, math_file, capsys):
    before = {name: (compared / name / "samples.jsonl").read_text() for name in ("base", "other", "again")}
    other = json.loads((compared / "other" / "eval_config.json").read_text())["model"]
    main(["eval", f"base={tiny_model_dir}", f"other={other}", f"again={tiny_model_dir}",
          "--data", f"sums={math_file}", "--out", str(compared), *FLAGS])
    assert "chunk" not in capsys.readouterr().err  # nothing sampled again
    assert {name: (compared / name / "samples.jsonl").read_text() for name in before} == before


def test_evals_with_other_seeds_are_shown_but_not_paired(compared, tiny_model_dir, math_file, tmp_path):
    main(["eval", tiny_model_dir, "--data", f"sums={math_file}", "--out", str(tmp_path / "seed1"), "--seed", "1",
          *FLAGS])
    write_table({"base": compared / "base", "seed1": tmp_path / "seed1"}, tmp_path / "table")
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    assert table["cells"]["seed1"]["sums"]["delta"] is None
    assert table["unpaired"] == {"seed1": {"sums": ["seed"]}}
    text = (tmp_path / "table" / "table.md").read_text()
    assert "| seed1 | not paired | not paired |" in text and "(differs in: seed)" in text


def test_models_are_named_by_folder_or_given_names():
    assert model_names(["a=x/m1", "x/m2"]) == {"a": "x/m1", "m2": "x/m2"}
    with pytest.raises(ValueError, match="two models are named 'm'"):
        model_names(["one/m", "two/m"])


def test_a_folder_that_is_no_finished_eval_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a finished eval of archer eval"):
        write_table({"a": tmp_path}, tmp_path / "table")


def test_a_cell_whose_n_or_k_is_not_its_columns_says_which_it_is():
    """Evals made separately (write_table over folders): the columns are the first model's avg@n and
    pass@k; another model's cell at another n or k is labelled, not shown as the column's figure."""
    from archer.eval.compare import format_table

    cell = lambda n, k: {"n": n, "k": k, "num_problems": 2, "avg@n": 0.5, "ci95": [0.25, 0.75], "pass@k": 0.5}
    table = {"models": ["base", "other"], "benchmarks": ["aime"], "baseline": "base", "unpaired": {}, "builtin": {},
             "cells": {"base": {"aime": cell(8, 8)}, "other": {"aime": {**cell(4, 4), "delta": None}}}}
    text = format_table(table)
    assert "| model | aime avg@8 | aime pass@8 |" in text
    assert "| other | 50.0 [25.0, 75.0] (avg@4) | 50.0 (pass@4) |" in text
