"""``WeightedSum``: several rewards in one, each with its weight (a correctness reward plus a format
or length term, as TRL's list of reward functions with ``reward_weights``).

.. math::

    r(y, x) = \\sum_i w_i \\, r_i(y, x)

for response :math:`y`, dataset row :math:`x`, rewards :math:`r_i` and weights :math:`w_i` (any
finite number; a negative weight is a penalty). A term that raises makes that response's score an
error (counted in ``reward/errors``, scored 0), never a sum that silently lacks a term; in a batched
sum, the other responses of the chunk keep their scores. In YAML each term
is a ``[reward, weight]`` pair::

    reward:
      class_path: archer.rewards.WeightedSum
      init_args:
        terms:
          - [{class_path: archer.rewards.MathReward}, 1.0]
          - [{class_path: my_rewards.FormatReward, init_args: {tag: answer}}, 0.1]
"""

from __future__ import annotations

import math

from archer.rewards.base import BatchedReward, Reward, is_batched

__all__ = ["WeightedSum"]


class WeightedSum(BatchedReward):
    """The weighted sum of several rewards' scores.

    It is batched (scored a chunk at a time, :class:`~archer.rewards.BatchedReward`) when one of its
    rewards is, and then calls that one with the whole chunk and the others one response at a time.

    Args:
        terms: ``(reward, weight)`` pairs, at least one.
    """

    def __init__(self, terms: list[tuple[Reward, float]]) -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        for index, term in enumerate(terms):
            if len(term) != 2 or not callable(term[0]):
                raise ValueError(f"WeightedSum term {index}: expected (reward, weight), got {term!r}")
            if not math.isfinite(float(term[1])):
                raise ValueError(f"WeightedSum term {index}: weight must be a finite number, got {term[1]!r}")
        self.terms = [(reward, float(weight)) for reward, weight in terms]
        self.batched = any(is_batched(reward) for reward, _ in self.terms)

    def score_batch(self, responses: list[str], rows: list[dict]) -> list[float]:
        totals = [0.0] * len(responses)
        for reward, weight in self.terms:
            if is_batched(reward):
                scores = list(reward.score_batch(responses, rows))
                if len(scores) != len(responses):
                    raise ValueError(f"{type(reward).__name__}.score_batch returned {len(scores)} scores for "
                                     f"{len(responses)} responses")
            else:  # a per-response term that raises fails its response alone, with its own error
                scores = [_or_error(reward, response, row) for response, row in zip(responses, rows)]
            totals = [total if isinstance(total, Exception) else score if isinstance(score, Exception)
                      else total + weight * float(score) for total, score in zip(totals, scores)]
        return totals

    def __call__(self, response: str, row: dict) -> float:
        return sum(weight * float(reward(response, row)) for reward, weight in self.terms)


def _or_error(reward: Reward, response: str, row: dict) -> float | Exception:
    try:
        return float(reward(response, row))
    except Exception as error:  # noqa: BLE001 - returned in the score's place: the runner reports it
        return error
