"""Each format users bring reads into the same rows; bad records name file:row:field."""

import json
import os
import pickle

import pyarrow as pa
import pytest
from make_fixtures import MATH, SOLUTIONS, compress_tests

from archer.data.formats import schema_of
from archer.data.rows import BadRowError, RowFields, lookup, read_rows
from archer.rewards import CodeReward

VERL = RowFields(answer="reward_model.ground_truth")
LCB = RowFields(prompt="question_content", tests="public_test_cases,private_test_cases", data_source="platform")


def test_verl_parquet_dotted_answer_chat_prompt_and_extra_fields(fixture_files):
    rows = read_rows(fixture_files["verl_math.parquet"], VERL).rows
    assert [row["answer"] for row in rows] == [answer for _, answer in MATH]
    assert rows[0]["prompt"] == [{"role": "user", "content": MATH[0][0]}]
    assert rows[0]["data_source"] == "toy_math"
    assert rows[2]["extra_info"] == {"split": "test", "index": 2}
    assert rows[0]["reward_model"]["style"] == "rule"  # the container of a dotted field is kept


def test_deepscaler_json_array_and_its_element_numbers(fixture_files, tmp_path):
    rows = read_rows(fixture_files["deepscaler.json"], RowFields(prompt="problem")).rows
    assert [(row["prompt"], row["answer"]) for row in rows] == MATH
    assert rows[0]["data_source"] == "deepscaler"  # the file's stem
    records = json.loads(fixture_files["deepscaler.json"].read_text())
    records[2] = {"answer": "1"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(BadRowError, match=rf"^{bad}:3:problem: missing"):
        read_rows(bad, RowFields(prompt="problem"))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"problem": "x", "answer": "1"},\n{"problem": \n')
    with pytest.raises(BadRowError, match=rf"^{broken}:4:<json>: broken JSON array"):
        read_rows(broken)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    # Windows editors and some exporters start UTF-8 text with a BOM (EF BB BF). Read as plain UTF-8,
    # it breaks the first JSONL line (dropped silently with skip_bad_rows) and hides a JSON array's "[".
    records = [{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode() + b"\n")
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode())
    for path in (jsonl, array):
        result = read_rows(path, skip_bad_rows=True)
        assert [(row["prompt"], row["answer"]) for row in result.rows] == [("p1", "1"), ("p2", "2")]
        assert result.num_skipped == 0
        assert schema_of(path) == [("prompt", "str"), ("answer", "str")]


def test_save_to_disk_dataset_and_dataset_dict(fixture_files):
    fields = RowFields(prompt="problem")
    rows = read_rows(fixture_files["hf_math"], fields).rows
    assert [(row["prompt"], row["answer"]) for row in rows] == MATH
    assert [row["prompt"] for row in read_rows(fixture_files["hf_dict"] / "test", fields).rows] == [MATH[3][0]]
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\]"):
        read_rows(fixture_files["hf_dict"], fields)


def test_arrow_ipc_file_and_row_numbers(tmp_path):
    path = tmp_path / "rows.arrow"
    table = pa.Table.from_pylist([{"prompt": "p", "answer": "1"}, {"prompt": "", "answer": "2"}])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(BadRowError, match=rf"^{path}:2:prompt: empty prompt"):
        read_rows(path)


def test_livecodebench_rows_public_and_compressed_private_tests(fixture_files):
    stdin_row, call_row = read_rows(fixture_files["lcb.jsonl"], LCB).rows
    assert stdin_row["tests"] == [
        {"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"}, {"input": "0 0\n", "output": "0\n"}
    ]
    assert call_row["tests"] == [
        {"fn_name": "largest", "input": "[1, 5, 2]", "output": "5"},
        {"fn_name": "largest", "input": "[-3, -1]", "output": "-1"},
    ]
    assert "answer" not in stdin_row and stdin_row["data_source"] == "atcoder"
    assert "private_test_cases" not in stdin_row  # consumed into "tests"
    reward = CodeReward(timeout_s=5.0)
    assert reward(f"```python\n{SOLUTIONS['add_two']}```", stdin_row) == 1.0
    assert reward(f"```python\n{SOLUTIONS['add_two'].replace('+', '-')}```", stdin_row) == 0.0
    assert reward(f"```python\n{SOLUTIONS['largest']}```", call_row) == 1.0


def test_taco_stdin_lines_and_call_tests_with_wrapped_outputs(fixture_files):
    stdin_row, call_row = read_rows(fixture_files["taco.jsonl"], RowFields(prompt="question", tests="input_output")).rows
    assert stdin_row["tests"] == [{"input": "3\n", "output": "6\n"}, {"input": "21", "output": "42"}]
    assert call_row["tests"][0] == {"fn_name": "repeat", "input": '"a"\n2', "output": '[["a", "a"]]',
                                    "alt_outputs": ['["a", "a"]']}
    reward = CodeReward(timeout_s=5.0)
    assert reward(SOLUTIONS["double"], stdin_row) == 1.0
    assert reward(SOLUTIONS["repeat"], call_row) == 1.0
    assert reward(SOLUTIONS["repeat"].replace("* times", "* (times + 1)"), call_row) == 0.0


def _lcb_record(**changes):
    record = {"question_content": "q", "platform": "toy", "public_test_cases": "[]", "private_test_cases": "[]",
              "metadata": "{}"}
    return json.dumps({**record, **changes})


@pytest.mark.parametrize(
    "line,field,reason",
    [
        # a pickle naming a global (here os.getcwd) is refused, never called
        (_lcb_record(private_test_cases=__import__("base64").b64encode(
            __import__("zlib").compress(pickle.dumps(os.getcwd))).decode()), "private_test_cases", "refusing to load"),
        (_lcb_record(private_test_cases="not json, not base64!"), "private_test_cases", "neither JSON nor"),
        (_lcb_record(private_test_cases=compress_tests([{"input": "1", "output": "2", "testtype": "functional"}])),
         "private_test_cases", "needs metadata.func_name"),
        (_lcb_record(public_test_cases=json.dumps([{"input": 1, "output": "2", "testtype": "stdin"}])),
         "public_test_cases", "string 'input' and 'output'"),
        (_lcb_record(public_test_cases=json.dumps([{"input": "1", "output": "2", "testtype": "interactive"}])),
         "public_test_cases", "testtype 'interactive'"),
    ],
)
def test_bad_code_tests_name_file_row_and_field(tmp_path, line, field, reason):
    path = tmp_path / "lcb.jsonl"
    path.write_text(_lcb_record() + "\n" + line + "\n")
    with pytest.raises(BadRowError, match=rf"^{path}:2:{field}: .*{reason}"):
        read_rows(path, LCB)


def test_missing_dotted_answer_and_lookup_into_json_strings(tmp_path):
    path = tmp_path / "verl.jsonl"
    path.write_text(json.dumps({"prompt": "p", "reward_model": {"style": "rule"}}) + "\n")
    with pytest.raises(BadRowError, match=rf"^{path}:1:reward_model.ground_truth: missing"):
        read_rows(path, VERL)
    assert lookup({"metadata": '{"func_name": "f"}'}, "metadata.func_name") == "f"
    assert lookup({"a.b": 1, "a": {"b": 2}}, "a.b") == 1  # a key with a dot wins
    assert lookup({"a": {"c": 1}}, "a.b") is None
