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


CNMO = r"\lambda=2\sqrt{2}, A(\pm 1, 0)"  # math-verify alone reads this reference as the number 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (CNMO, 1.0),  # as written
        (r"A(\pm 1, 0), \lambda = \sqrt{8}", 1.0),  # parts in another order; the value written otherwise
        (r"\lambda=3\sqrt{2}, A(\pm 1, 0)", 0.0),  # one value wrong
        (r"\lambda=2\sqrt{2}, A(\pm 5, 0)", 0.0),  # the point wrong (math-verify reads both points as 0)
        (r"\lambda=2\sqrt{2}, 0", 0.0),
        (r"0", 0.0),  # took 1 before
        (r"\lambda=2\sqrt{2}", 0.0),  # a part missing
    ],
)
def test_a_reference_math_verify_reads_as_one_of_its_labelled_parts_is_graded_part_by_part(answer, expected):
    assert score(f"\\boxed{{{answer}}}", CNMO) == expected


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        (r"10,\!080", "10080"), (r"1,\!000,\!000", "1000000"), (r"\$1,000", "1000"), (r"12,000 \text{ dollars}", "12000"),
        ("1, -1", r"\pm 1"), ("1, 2", r"x=1 \text{ or } x=2"), ("1, 2", r"1 \text{ and } 2"),
        ("1, 2, 3", "3, 2, 1"), ("1, 2, 3", r"\{3,2,1\}"), ("x=1, y=2", "y=2, x=1"), ("(1, 2)", "(1,2)"),
    ],
)
def test_answers_math_verify_reads_as_sets_numbers_or_tuples_keep_its_verdict(gold, answer):
    """Commas in thousands, sets of solutions in another order or notation, tuples: math-verify's
    verdict (1), not the part-by-part rule (which would refuse most of these)."""
    assert score(f"\\boxed{{{answer}}}", gold) == 1.0


def test_a_wrong_set_is_still_refused():
    assert score(r"\boxed{1, 2}", "1, 2, 3") == 0.0
