"""Reading rows: every kind of bad row names file:line:field, or is a counted skip."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from make_fixtures import MATH

from archer.data.rows import BadRowError, RowFields, read_rows

GOOD = {"prompt": "2+2=", "answer": "4"}

BAD_LINES = [  # (line text, field named in the error)
    ('{"prompt": "2+2=", "answer": "4"', "<json>"),  # broken JSON
    ('["2+2=", "4"]', "<row>"),  # not an object
    (json.dumps({"answer": "4"}), "prompt"),  # missing prompt
    (json.dumps({"prompt": "2+2="}), "answer"),  # missing answer
    (json.dumps({"prompt": "   ", "answer": "4"}), "prompt"),  # empty prompt
    (json.dumps({"prompt": [], "answer": "4"}), "prompt"),  # empty message list
    (json.dumps({"prompt": 42, "answer": "4"}), "prompt"),  # wrong type
    (json.dumps({"prompt": [{"role": "user"}], "answer": "4"}), "prompt"),  # message without content
    (json.dumps({"prompt": "2+2=", "answer": 4.0}), "answer"),  # float answer: no exact spelling
    (json.dumps({"prompt": "2+2=", "answer": "4", "tests": 3}), "tests"),  # wrong tests type
]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line,field", BAD_LINES)
def test_bad_row_names_file_line_and_field(tmp_path, bad_line, field):
    # Line 1 good, line 2 blank (ignored, still counted in numbering), line 3 bad.
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", bad_line])
    with pytest.raises(BadRowError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"{path}:3:{field}: ")
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, field)
    assert isinstance(info.value, ValueError)


def test_skip_bad_rows_counts_every_bad_row(tmp_path):
    lines = [json.dumps(GOOD)] + [line for line, _ in BAD_LINES] + [json.dumps({"prompt": "1+1=", "answer": 2})]
    result = read_rows(write_lines(tmp_path / "mixed.jsonl", lines), skip_bad_rows=True)
    assert result.num_skipped == len(BAD_LINES) == 10
    assert [row["prompt"] for row in result.rows] == ["2+2=", "1+1="]
    assert result.rows[1]["answer"] == "2"  # an integer answer becomes its decimal string


def test_custom_field_names_become_canonical_keys_and_extra_fields_are_kept(tmp_path):
    record = {"question": [{"role": "user", "content": "hi"}], "solution": "x", "cases": [{"assert": "assert 1"}], "id": 7}
    path = write_lines(tmp_path / "code.jsonl", [json.dumps(record)])
    rows = read_rows(path, RowFields(prompt="question", answer="solution", tests="cases")).rows
    expected = {"prompt": record["question"], "answer": "x", "tests": [{"assert": "assert 1"}], "id": 7, "data_source": "code"}
    assert rows == [expected]


def test_a_verl_parquet_is_read_as_it_is_and_says_so_once(fixture_files, caplog):
    # verl_math.parquet (written with pyarrow by make_fixtures): chat prompt, reward_model.ground_truth,
    # data_source; no `answer` field, and no answer_key given.
    path = fixture_files["verl_math.parquet"]
    with caplog.at_level(logging.WARNING, logger="archer.data.rows"):
        rows = read_rows(path).rows
    assert [row["answer"] for row in rows] == [answer for _, answer in MATH]
    assert rows[0]["prompt"] == [{"role": "user", "content": MATH[0][0]}] and rows[0]["data_source"] == "toy_math"
    assert rows[0]["reward_model"]["style"] == "rule"  # the container is kept, as with the key given
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and str(path) in notes[0] and "reward_model.ground_truth" in notes[0]


def test_the_verl_fallback_yields_to_an_answer_field_and_to_tests_and_names_its_field(tmp_path, caplog):
    def verl_row(ground_truth, **fields):
        return json.dumps({"prompt": "p", "reward_model": {"ground_truth": ground_truth}, **fields})

    both = write_lines(tmp_path / "both.jsonl", [verl_row("2", answer="1")])
    with caplog.at_level(logging.WARNING, logger="archer.data.rows"):
        assert read_rows(both).rows[0]["answer"] == "1"
    assert not caplog.records
    # reward_model.ground_truth read as the tests of code rows: not an answer too.
    tests = [{"input": "1\n", "output": "1\n"}]
    code = write_lines(tmp_path / "code.jsonl", [verl_row(json.dumps(tests))])
    row = read_rows(code, RowFields(tests="reward_model.ground_truth")).rows[0]
    assert "answer" not in row and row["tests"] == tests
    listed = write_lines(tmp_path / "listed.jsonl", [verl_row(["4", "four"])])
    with pytest.raises(BadRowError, match=rf"^{listed}:1:reward_model.ground_truth: is list, expected a string"):
        read_rows(listed)


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "", "answer": "1"}]), path)
    with pytest.raises(BadRowError, match=rf"^{path}:2:prompt: empty prompt"):
        read_rows(path)
    assert read_rows(path, skip_bad_rows=True).num_skipped == 1


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_rows(tmp_path / "x.csv")


@pytest.mark.parametrize("payload", [
    b"\x80\x04}]Ns.",  # a dict keyed by a list: the unpickler raises TypeError (unhashable)
    b"\x80\x04h\x05.",  # a memo lookup of a missing entry
])
def test_corrupt_compressed_tests_name_file_line_and_field(tmp_path, payload):
    # Whatever the restricted unpickler raises on bad bytes becomes the row's error, not a traceback.
    import base64
    import zlib

    row = {"question_content": "Sum two ints.", "private_test_cases": base64.b64encode(zlib.compress(payload)).decode()}
    path = write_lines(tmp_path / "lcb.jsonl", [json.dumps(row)])
    fields = RowFields(prompt="question_content", tests="private_test_cases")
    with pytest.raises(BadRowError) as info:
        read_rows(path, fields)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 1, "private_test_cases")
    assert read_rows(path, fields, skip_bad_rows=True).num_skipped == 1
