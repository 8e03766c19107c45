"""Eval figures against hand-computed values: pass@k, majority votes, bootstrap bounds, a results table."""

import pytest

from archer.eval.records import SampleRecord
from archer.eval.results import dataset_results, format_markdown
from archer.eval.stats import bootstrap_interval, maj_at_k, majority_vote_score, pass_at_k_of


def test_pass_at_k_by_hand():
    # n = 4, c = 1: pass@2 = 1 − C(3, 2) / C(4, 2) = 1 − 3/6
    assert pass_at_k_of(1, 4, 2) == pytest.approx(0.5)
    # n = 4, c = 2: pass@1 = 2/4; pass@3 = 1 (n − c = 2 < 3)
    assert pass_at_k_of(2, 4, 1) == pytest.approx(0.5)
    assert pass_at_k_of(2, 4, 3) == 1.0
    assert pass_at_k_of(0, 4, 4) == 0.0


def test_majority_vote_ties_and_missing_answers():
    assert majority_vote_score(["5", "5", "3"], [True, True, False]) == 1.0
    assert majority_vote_score(["3", "3", "5"], [False, False, True]) == 0.0
    # tie between "5" (right) and "3" (wrong): the expected score of a random tie break, 1/2
    assert majority_vote_score(["5", "3", None], [True, False, False]) == 0.5
    # three-way tie, one right: 1/3
    assert majority_vote_score(["a", "b", "c"], [False, True, False]) == pytest.approx(1 / 3)
    # no answer extracted at all: no votes
    assert majority_vote_score([None, None], [False, False]) == 0.0


def test_maj_at_k_over_consecutive_blocks():
    answers = ["1", "1", "2", "3", "3", "3", "9"]  # n = 7
    correct = [a == "3" for a in answers]
    # k = 3: blocks [1 1 2] -> "1" wrong (0), [3 3 3] -> right (1); sample 6 left out: mean 1/2
    assert maj_at_k(answers, correct, 3) == 0.5
    # k = 7: "3" has 3 votes of 7 -> right
    assert maj_at_k(answers, correct, 7) == 1.0
    # k = 1: each block is one sample: maj@1 = mean correctness = 3/7
    assert maj_at_k(answers, correct, 1) == pytest.approx(3 / 7)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, 8)


def test_bootstrap_interval_by_hand():
    assert bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
    # Two problems scoring 0 and 1: a resampled mean is 0, 1/2 or 1 with chance 1/4, 1/2, 1/4; the
    # 2.5 % and 97.5 % quantiles are 0 and 1 (each end has 1/4 of the mass).
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # Four problems 0 0 0 1: the mean is Binomial(4, 1/4)/4. P(mean = 0) = 81/256 ≈ 0.32 > 0.025,
    # so the lower bound is 0; P(mean >= 3/4) = 13/256 ≈ 0.051 > 0.025 but P(mean = 1) = 1/256
    # ≈ 0.004 < 0.025, so the upper bound is 3/4.
    assert bootstrap_interval([0.0, 0.0, 0.0, 1.0], num_resamples=20000) == (0.0, 0.75)


def _records(table):
    """``{problem: [(answer, score, length, truncated), ...]}`` -> records of data set "toy"."""
    return [
        SampleRecord("toy", problem, sample, f"response {problem}.{sample}", answer, score, length, truncated)
        for problem, samples in table.items()
        for sample, (answer, score, length, truncated) in enumerate(samples)
    ]


HAND = {  # n = 4 samples per problem, 3 problems
    0: [("5", 1.0, 10, False), ("5", 1.0, 20, False), ("4", 0.0, 30, False), (None, 0.0, 40, True)],
    1: [("2", 0.0, 8, True), ("2", 0.0, 8, True), ("7", 1.0, 8, False), ("1", 0.0, 8, False)],
    2: [("0", 0.0, 4, False), (None, 0.0, 4, False), ("0", 0.0, 4, False), ("3", 0.0, 4, False)],
}


def test_dataset_results_from_hand_made_records():
    results = dataset_results(_records(HAND), 4, [1, 2, 4], majority=True, num_resamples=500)
    # correct per problem: 2/4, 1/4, 0/4 -> avg@4 = (0.5 + 0.25 + 0) / 3 = 0.25
    assert results["avg@n"] == pytest.approx(0.25)
    # pass@2: p0 = 1 − C(2,2)/C(4,2) = 5/6; p1 = 1 − C(3,2)/C(4,2) = 1/2; p2 = 0 -> 4/9
    assert results["pass@k"] == pytest.approx({"1": 0.25, "2": 4 / 9, "4": 2 / 3})
    # maj@1 = mean correctness; maj@2: p0 blocks [5 5] right, [4 -] wrong -> 1/2; p1 [2 2] wrong,
    # [7 1] tie -> 1/2 -> 1/4; p2 0 -> (1/2 + 1/4 + 0) / 3 = 1/4; maj@4: p0 "5" right; p1 "2" wrong;
    # p2 "0" wrong -> 1/3
    assert results["maj@k"] == pytest.approx({"1": 0.25, "2": 0.25, "4": 1 / 3})
    # lengths: 25, 8, 4 -> 37/3; truncated: 1/4, 2/4, 0 -> 1/4
    assert results["mean_length"] == pytest.approx(37 / 3)
    assert results["truncation_rate"] == pytest.approx(0.25)
    assert (results["n"], results["num_problems"]) == (4, 3)
    low, high = results["ci95"]["avg@n"]
    assert 0.0 <= low <= 0.25 <= high <= 0.5  # the interval of means of {0.5, 0.25, 0}
    assert set(results["ci95"]["pass@k"]) == {"1", "2", "4"}


def test_incomplete_problem_is_an_error_and_code_has_no_majority():
    records = _records(HAND)[:-1]
    with pytest.raises(ValueError, match="problem 2 has samples \\[0, 1, 2\\]"):
        dataset_results(records, 4, [1], majority=False)
    assert "maj@k" not in dataset_results(_records(HAND), 4, [1], majority=False, num_resamples=10)


def test_markdown_table_reads_like_the_paper():
    results = {"toy": dataset_results(_records(HAND), 4, [1, 4], majority=True, num_resamples=10)}
    text = format_markdown(results, "tiny")
    assert "| model | toy avg@4 | toy pass@4 |" in text
    assert "| tiny | 25.0 | 66.7 |" in text
    assert "| toy | maj@4 | 33.3 |" in text
    assert "| toy | mean length (tokens) | 12.3 |" in text
