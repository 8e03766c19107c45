"""Prompt templates, ``archer data inspect`` (hand-counted token lengths) and ``archer data convert``."""

import pytest
from make_fixtures import MATH

from archer.cli import main
from archer.data import PromptDataModule
from archer.data.inspection import nearest_rank_percentile
from archer.data.rows import RowFields, read_rows
from archer.data.template import R1_MATH_TEMPLATE, apply_prompt_template

R1_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_template_wraps_strings_and_the_last_user_message():
    assert apply_prompt_template("What is 1+1?", "r1-math") == "What is 1+1?" + R1_SUFFIX
    assert apply_prompt_template("x", "Q: {prompt} A:") == "Q: x A:"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    wrapped = apply_prompt_template(messages, "[{prompt}]")
    assert [m["content"] for m in wrapped] == ["s", "a", "b", "[c]"]
    assert messages[3]["content"] == "c"  # the input is not changed
    assert apply_prompt_template("x", None) == "x"
    with pytest.raises(ValueError, match="exactly one"):
        apply_prompt_template("x", "no placeholder")
    with pytest.raises(ValueError, match="needs a user message"):
        apply_prompt_template([{"role": "system", "content": "s"}], "{prompt}")


def test_datamodule_renders_the_template(fixture_files, tiny_model_dir):
    data = PromptDataModule(tiny_model_dir, train_files=[str(fixture_files["deepscaler.json"])], prompt_key="problem",
                            prompt_template=R1_MATH_TEMPLATE)
    data.setup()
    text = data.train_items[0]["prompt_text"]
    # tiny chat template: <|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n
    assert text == f"<|im_start|>user\n{MATH[0][0]}{R1_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"


def test_nearest_rank_percentile_by_hand():
    values = [5, 1, 3, 2, 4]  # sorted 1 2 3 4 5
    assert [nearest_rank_percentile(values, q) for q in (20, 50, 90, 100)] == [1, 3, 5, 5]
    assert nearest_rank_percentile([7], 50) == 7


def test_data_inspect_prints_schema_rows_lengths_and_a_prompt(fixture_files, tiny_model_dir, capsys):
    main(["data", "inspect", str(fixture_files["deepscaler.json"]), "--model", tiny_model_dir, "--prompt-key", "problem"])
    out = capsys.readouterr().out
    assert "  problem: str" in out and "  solution: str" in out
    assert "rows: 4 (0 bad skipped, 0 with tests)" in out
    # Character tokenizer: the rendered prompt is the problem + 19 tokens of chat markup
    # (<|im_start|> "user\n" ... <|im_end|> "\n" <|im_start|> "assistant\n" = 1+5+1+1+1+10).
    lengths = sorted(len(problem) + 19 for problem, _ in MATH)
    assert f"prompt tokens: p50 {lengths[1]}  p90 {lengths[3]}  p99 {lengths[3]}  max {lengths[3]}" in out
    # Answers "7", "3", "\frac{1}{2}" (11 characters), "6": sorted 1 1 1 11.
    assert "answer tokens: p50 1  p90 11  p99 11  max 11" in out
    assert f"<|im_start|>user\n{MATH[0][0]}<|im_end|>" in out


def test_data_convert_normalises_and_bakes_the_template(fixture_files, tmp_path, capsys):
    out = tmp_path / "math.jsonl"
    main(["data", "convert", str(fixture_files["verl_math.parquet"]), str(out),
          "--answer-key", "reward_model.ground_truth", "--prompt-template", "r1-math"])
    assert "wrote 4 rows" in capsys.readouterr().out
    rows = read_rows(out).rows  # default field names read the converted file
    assert [row["answer"] for row in rows] == [answer for _, answer in MATH]
    assert rows[1]["prompt"] == [{"role": "user", "content": MATH[1][0] + R1_SUFFIX}]
    assert rows[1]["data_source"] == "toy_math"


def test_data_inspect_and_convert_read_a_verl_parquet_without_answer_key(fixture_files, tmp_path, tiny_model_dir, capsys):
    source = fixture_files["verl_math.parquet"]
    main(["data", "inspect", str(source), "--model", tiny_model_dir])
    out = capsys.readouterr().out
    assert "rows: 4 (0 bad skipped, 0 with tests)" in out
    assert "answer tokens: p50 1  p90 11  p99 11  max 11" in out  # the answers of MATH, as above
    out = tmp_path / "math.jsonl"
    main(["data", "convert", str(source), str(out)])
    assert "wrote 4 rows" in capsys.readouterr().out
    assert [row["answer"] for row in read_rows(out).rows] == [answer for _, answer in MATH]


def test_data_convert_code_rows_to_parquet_round_trip(fixture_files, tmp_path):
    fields = RowFields(prompt="question_content", tests="public_test_cases,private_test_cases")
    out = tmp_path / "lcb.parquet"
    main(["data", "convert", str(fixture_files["lcb.jsonl"]), str(out), "--prompt-key", "question_content",
          "--tests-key", "public_test_cases,private_test_cases"])
    # Parquet stores the tests as a JSON string: reading back gives the same test dicts, no null fields.
    assert read_rows(out).rows == read_rows(fixture_files["lcb.jsonl"], fields).rows
    assert read_rows(out).rows[1]["tests"][0] == {"fn_name": "largest", "input": "[1, 5, 2]", "output": "5"}
