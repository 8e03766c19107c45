"""Per-problem figures of an evaluation, and a bootstrap interval over problems (pure functions).

For one problem with ``n`` sampled responses, scores ``s_1..s_n`` (1 = correct) and extracted
answers ``a_1..a_n``:

* ``avg@n`` = mean of ``s_j`` (the paper's headline number, pass@1 estimated from n samples);
* ``pass@k`` = ``1 − C(n − c, k) / C(n, k)`` with ``c`` the number of correct responses, the
  unbiased estimator (:func:`archer.metrics.pass_at_k`);
* ``maj@k``: the responses are cut into ``n // k`` consecutive blocks of ``k`` (samples
  ``0..k-1``, ``k..2k-1``, …; a remainder is left out); in each block the most frequent
  extracted answer wins (responses with no answer do not vote) and the block scores whether the
  winner is correct, with a tie counted as the share of tied answers that are correct (the
  expected score of a random tie break); a block without votes scores 0. ``maj@k`` is the mean
  over blocks. With ``k = n`` it is the usual majority vote over all samples. Answers vote as
  normalised strings, so ``1/2`` and ``\\frac{1}{2}`` are different votes.

A data set's figure is the mean over its problems; :func:`bootstrap_interval` gives a percentile
bootstrap interval of that mean, resampling problems with replacement.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from archer.metrics import pass_at_k

__all__ = ["mean", "pass_at_k_of", "majority_vote_score", "maj_at_k", "bootstrap_interval"]


def mean(values: list[float]) -> float:
    """Arithmetic mean; ValueError for no values."""
    if not values:
        raise ValueError("mean of no values")
    return float(sum(values) / len(values))


def pass_at_k_of(num_correct: int, num_samples: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``num_correct`` of ``num_samples`` responses correct."""
    return float(pass_at_k(num_samples, torch.tensor([num_correct]), k)[0])


def majority_vote_score(answers: list[str | None], correct: list[bool]) -> float:
    """Score of the majority answer among ``answers`` (``correct[j]`` says whether answer j is right).

    Ties count as the share of tied answers that are correct; no votes score 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [answer for answer, count in votes.items() if count == top]
    right = {answer for answer, ok in zip(answers, correct) if ok and answer is not None}
    return sum(winner in right for winner in winners) / len(winners)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """maj@k of one problem: the mean majority-vote score over ``len(answers) // k`` consecutive blocks."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={len(answers)}")
    blocks = range(0, len(answers) // k * k, k)
    return mean([majority_vote_score(answers[i : i + k], correct[i : i + k]) for i in blocks])


def bootstrap_interval(
    values: list[float], *, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``: resample the values (problems) with
    replacement ``num_resamples`` times and take the ``(1 ± confidence) / 2`` quantiles of the
    resampled means (inverted-CDF quantiles, so the bounds are attainable means)."""
    if not values:
        raise ValueError("bootstrap of no values")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(num_resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)
