"""The reward protocol: a callable that scores one response against its dataset row."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Reward(Protocol):
    """Scores one generated response.

    ``row`` is the dataset row the prompt came from (keys such as ``prompt``, ``answer``,
    ``tests``, ``data_source``). Implementations are plain classes with a typed ``__init__``
    so a YAML config can select them by ``class_path``; they must be picklable, because
    :class:`archer.rewards.RewardRunner` hands them to worker processes.
    """

    def __call__(self, response: str, row: dict) -> float: ...
