"""MathReward / math.score over tricky equivalent and non-equivalent pairs, and hostile inputs."""


import pytest

from archer.rewards import MathReward
from archer.rewards.math import fallback_answer, last_boxed, score

EQUIVALENT = [
    ("\\frac{1}{2}", "so the result is \\boxed{0.5}"),  # fraction vs decimal
    ("0.5", "The answer is $\\frac{1}{2}$."),  # "answer is" fallback, LaTeX fraction
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),  # sqrt(8) = 2 sqrt(2)
    ("(1,2)", "\\boxed{(1, 2)}"),  # tuple, spacing differs
    ("50\\%", "\\boxed{0.5}"),  # 50% = 0.5
    ("1000", "\\boxed{1,000}"),  # thousands separator
    ("1,000", "Answer: 1000"),
    ("B", "\\boxed{B}"),  # multiple choice
    ("B", "The answer is (B)."),
    ("(0,1]", "\\boxed{(0,1]}"),  # interval
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),  # set order does not matter
    ("3", "\\boxed{4} wait, no: \\boxed{3}"),  # the LAST box counts
    ("18", "5 apples and then 18"),  # last-number fallback
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),  # symbolic equality
]
NOT_EQUIVALENT = [
    ("(1,2)", "\\boxed{(2, 1)}"),  # tuples are ordered
    ("B", "\\boxed{\\text{C}}"),
    ("(0,1]", "\\boxed{[0,1]}"),  # closed vs half-open
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}"),
    ("3", "\\boxed{3} wait, no: \\boxed{4}"),
    ("18", "I thought 18, but the answer is 17"),  # the phrase beats an earlier number
    ("\\frac{2}{3}", "\\boxed{0.67}"),  # 2/3 = 0.6667 != 0.67: no loose rounding
    ("1000", "\\boxed{100}"),
]


@pytest.mark.parametrize(("truth", "response"), EQUIVALENT)
def test_equivalent_answers_score_one(truth, response):
    assert score(response, truth) == 1.0


@pytest.mark.parametrize(("truth", "response"), NOT_EQUIVALENT)
def test_different_answers_score_zero(truth, response):
    assert score(response, truth) == 0.0


def test_fallback_can_be_switched_off():
    assert score("the answer is 7", "7") == 1.0
    assert score("the answer is 7", "7", fallback=False) == 0.0


def test_last_boxed_handles_nested_and_unclosed_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("no box") is None
    assert fallback_answer("values 3, 4 and -12.5") == "-12.5"


def test_reward_reads_row_answer_and_names_missing_key():
    assert MathReward()("\\boxed{42}", {"answer": "42"}) == 1.0
    with pytest.raises(KeyError, match="row\\['answer'\\]"):
        MathReward()("\\boxed{42}", {"prompt": "p"})


@pytest.mark.parametrize(
    "response",
    [
        "x" * 1_000_000 + " \\boxed{4}",  # megabyte response: only the tail is searched
        "\\boxed{" + "{" * 100_000,  # unclosed deep nest
        "\\boxed{" + "{" * 200 + "}" * 200 + "}",  # closed deep nest
        "9" * 1_000_000,  # a megabyte "number"
        "\\boxed{" + "(" * 400 + ")" * 400 + "}",
    ],
)
def test_hostile_inputs_answer_zero(response):
    # How fast (milliseconds: only the tail is read, deep nests are refused unparsed) is measured by
    # benchmarks/bench_rewards.py, not asserted here: a loaded machine would fail a time bound.
    assert score(response, "3") == 0.0


def test_time_limit_bounds_slow_sympy():
    # depth 7: allowed, but sympy takes seconds; the limit makes it a 0 (its duration: bench_rewards.py)
    tower = "\\boxed{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}"
    assert score(tower, "3", timeout_s=0.5) == 0.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"\boxed{\lambda=2\sqrt{2}, A(\pm 1, 0)}", 1.0),  # as written
        (r"\boxed{A(\pm 1, 0), \lambda = \sqrt{8}}", 1.0),  # parts in another order, one written otherwise
        (r"\boxed{\lambda=3\sqrt{2}, A(\pm 1, 0)}", 0.0),  # one part wrong
        (r"\boxed{0}", 0.0),  # math-verify alone reads the reference as 0 and took this
        (r"\boxed{\lambda=2\sqrt{2}}", 0.0),  # a part missing
    ],
)
def test_an_answer_of_several_parts_is_graded_part_by_part(response, expected):
    assert score(response, r"\lambda=2\sqrt{2}, A(\pm 1, 0)") == expected


def test_a_set_of_values_matches_in_any_order_and_with_set_braces():
    assert score(r"\boxed{3, 2, 1}", "1, 2, 3") == 1.0
    assert score(r"\boxed{\{3,2,1\}}", "1, 2, 3") == 1.0
    assert score(r"\boxed{1, 2}", "1, 2, 3") == 0.0
    assert score(r"\boxed{(1, 2)}", "(1,2)") == 1.0  # a tuple is one part
