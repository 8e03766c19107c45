"""Synthetic tasks: deterministic rows, and scores of hand-written right and wrong responses."""

import pytest

from archer.data.tasks import (
    AdditionTask,
    CountdownTask,
    DigitCopyTask,
    DigitSumTask,
    ReverseTask,
    first_char,
    first_word,
)

ALL_TASKS = [DigitCopyTask(), DigitSumTask(), AdditionTask(2), ReverseTask(), CountdownTask()]


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.data_source)
def test_rows_are_deterministic_per_seed_and_differ_across_seeds(task):
    assert task.rows(50, seed=3) == task.rows(50, seed=3)
    assert task.rows(50, seed=3) != task.rows(50, seed=4)
    # A longer list extends a shorter one: the k-th row does not depend on how many are asked for.
    assert task.rows(60, seed=3)[:50] == task.rows(50, seed=3)
    assert all(row["data_source"] == task.data_source for row in task.rows(5, seed=0))


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.data_source)
def test_every_generated_answer_scores_one_and_task_is_its_reward(task):
    for row in task.rows(200, seed=1):
        assert task.score(row["answer"], row) == 1.0
        assert task(row["answer"] + " trailing words", row) == 1.0
        assert task("", row) == 0.0


def test_first_char_and_first_word():
    assert first_char("  \n7abc") == "7"
    assert first_char(" \t") == ""
    assert first_word("\n 12 + 3") == "12"
    assert first_word("") == ""


def test_digit_copy():
    task = DigitCopyTask()
    row = {"prompt": "copy 7", "answer": "7"}
    assert task("7", row) == 1.0
    assert task(" 7x", row) == 1.0  # first non-whitespace character is '7'
    assert task("77", row) == 1.0  # only the first character is read
    assert task("x7", row) == 0.0
    assert task("1", row) == 0.0


def test_digit_sum_rows_hold_last_digit_of_sum():
    task = DigitSumTask()
    row = {"prompt": "7+8=", "answer": "5"}  # 7 + 8 = 15 -> last digit 5
    assert task("5", row) == 1.0
    assert task("15", row) == 0.0  # first character is '1'
    for generated in task.rows(100, seed=0):
        a, b = generated["prompt"].rstrip("=").split("+")
        assert generated["answer"] == str((int(a) + int(b)) % 10)


def test_addition():
    task = AdditionTask(num_digits=3)
    row = {"prompt": "123+456=", "answer": "579"}  # 123 + 456 = 579
    assert task("579", row) == 1.0
    assert task("579 because", row) == 1.0
    assert task("5790", row) == 0.0
    assert task("57 9", row) == 0.0
    for generated in task.rows(50, seed=0):
        a, b = generated["prompt"].rstrip("=").split("+")
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
        assert generated["answer"] == str(int(a) + int(b))


def test_reverse():
    task = ReverseTask(min_length=3, max_length=3)
    row = {"prompt": "reverse abc", "answer": "cba"}
    assert task("cba", row) == 1.0
    assert task("abc", row) == 0.0
    assert task("cb", row) == 0.0
    assert all(len(r["answer"]) == 3 and r["prompt"] == "reverse " + r["answer"][::-1] for r in task.rows(20, 0))


def test_countdown_accepts_any_correct_expression_and_rejects_cheats():
    task = CountdownTask()
    row = {"prompt": "use 2 3 5 make 13", "answer": "3*5-2", "numbers": [2, 3, 5], "target": 13}
    assert task("3*5-2", row) == 1.0  # 15 - 2 = 13
    assert task("5*3-2", row) == 1.0  # another order, same numbers
    assert task("(5-2)*3+4", row) == 0.0  # = 13, but 4 is not given
    assert task("2+3+5", row) == 0.0  # 10, not 13
    assert task("13", row) == 0.0  # does not use the numbers
    assert task("3*5-2-0", row) == 0.0  # 0 is not given
    assert task("3*5-2*1", row) == 0.0  # 1 is not given
    assert task("__import__('os')", row) == 0.0  # names are never evaluated
    assert task("3**5", row) == 0.0  # power is not an allowed operator
    assert task("3*5-", row) == 0.0  # syntax error
    row_repeat = {"numbers": [2, 2, 9], "target": 13}
    assert task("2+2+9", row_repeat) == 1.0  # 4 + 9 = 13 uses both 2s
    assert task("2+9", {"numbers": [2, 2, 9], "target": 11}) == 0.0  # one 2 unused


def test_countdown_rows_are_consistent():
    for row in CountdownTask(num_numbers=3, max_number=9).rows(50, seed=0):
        assert row["target"] == eval(row["answer"])  # the reference expression reaches the target
        operands = row["answer"].replace("+", " ").replace("-", " ").replace("*", " ").split()
        assert sorted(map(int, operands)) == row["numbers"]
        assert row["prompt"] == f"use {' '.join(map(str, row['numbers']))} make {row['target']}"


@pytest.mark.parametrize("bad", [lambda: AdditionTask(0), lambda: ReverseTask(4, 2), lambda: CountdownTask(1)])
def test_bad_task_settings_raise(bad):
    with pytest.raises(ValueError):
        bad()
