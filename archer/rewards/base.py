"""The reward protocols: a callable that scores one response against its dataset row, and the
batched form that scores many in one call."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["BatchedReward", "Reward", "is_batched"]


@runtime_checkable
class Reward(Protocol):
    """Scores one generated response.

    ``row`` is the dataset row the prompt came from (keys such as ``prompt``, ``answer``,
    ``tests``, ``data_source``). Implementations are plain classes with a typed ``__init__``
    so a YAML config can select them by ``class_path``; they must be picklable, because
    :class:`archer.rewards.RewardRunner` hands them to worker processes.
    """

    def __call__(self, response: str, row: dict) -> float: ...


class BatchedReward:
    """Base class of a reward that scores many responses in one call: a reward model on a GPU, a
    scoring service, a vectorised check.

    Subclasses implement :meth:`score_batch`; ``batched = True`` makes
    :class:`~archer.rewards.RewardRunner` call it with a chunk of the step's responses (one chunk per
    worker process, given ``k × timeout_s`` for ``k`` responses) instead of one response at a time.
    ``__call__`` scores one response through it, so a batched reward is also a :class:`Reward`
    (``archer eval``, ``RoutedReward`` and YAML's ``class_path`` accept it as one).
    """

    batched: bool = True
    """Whether the runner calls :meth:`score_batch` (a subclass that wraps others may decide per instance)."""

    def score_batch(self, responses: list[str], rows: list[dict]) -> list[float]:
        """One score per response, in order (``len(responses) == len(rows)``); an exception in a
        score's place fails that response alone (the runner counts and reports it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch(responses, rows)")

    def __call__(self, response: str, row: dict) -> float:
        return self.score_batch([response], [row])[0]


def is_batched(reward: object) -> bool:
    """Whether ``reward`` is scored a chunk at a time (:class:`BatchedReward`'s ``batched``)."""
    return bool(getattr(reward, "batched", False)) and callable(getattr(reward, "score_batch", None))
