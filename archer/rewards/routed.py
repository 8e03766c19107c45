"""``RoutedReward``: one reward per ``data_source``, so one run can mix math and code rows.

The official Archer reward picks its scorer from each row's ``data_source`` (math sources go to
the math verifier, code sources to the test runner); ``RoutedReward`` does the same with any
rewards. A route key is a ``data_source`` name or an ``fnmatch`` pattern (``lcb*``,
``livecodebench_v[56]``): an exact name wins over patterns, then patterns are tried in the order
given. A source that no route matches is an error, never a silent 0: call
:meth:`RoutedReward.check_data_sources` with every source of the data before training or
evaluating, so a typo stops the run at start-up.

In YAML::

    reward:
      class_path: archer.rewards.RoutedReward
      init_args:
        routes:
          math: {class_path: archer.rewards.MathReward}
          "aime*": {class_path: archer.rewards.MathReward}
          "lcb*": {class_path: archer.rewards.CodeReward, init_args: {timeout_s: 6.0}}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from archer.rewards.base import Reward

__all__ = ["RoutedReward"]

_PATTERN_CHARACTERS = frozenset("*?[")


class RoutedReward:
    """Scores each row with the reward its ``row["data_source"]`` routes to.

    Args:
        routes: ``data_source`` name or ``fnmatch`` pattern -> reward. Exact names are matched
            first, then patterns in the order given.
    """

    def __init__(self, routes: dict[str, Reward]) -> None:
        if not routes:
            raise ValueError("RoutedReward needs at least one route")
        for key, reward in routes.items():
            if not callable(reward):
                raise TypeError(f"RoutedReward route {key!r}: {type(reward).__name__} is not a reward (not callable)")
        self.routes = dict(routes)

    def route(self, data_source: str) -> Reward:
        """The reward for ``data_source``; KeyError naming the routes when none matches."""
        if data_source in self.routes:
            return self.routes[data_source]
        for key, reward in self.routes.items():
            if _PATTERN_CHARACTERS & set(key) and fnmatch.fnmatchcase(data_source, key):
                return reward
        raise KeyError(f"no RoutedReward route for data_source {data_source!r}; routes: {list(self.routes)}")

    def check_data_sources(self, names: Iterable[str]) -> None:
        """Raise ValueError naming every source in ``names`` that no route matches."""
        unknown = []
        for name in dict.fromkeys(names):
            try:
                self.route(name)
            except KeyError:
                unknown.append(name)
        if unknown:
            raise ValueError(
                f"RoutedReward has no route for data_source {unknown}; routes: {list(self.routes)} "
                "(add a route, or a pattern such as 'lcb*')"
            )

    def _row_source(self, row: dict) -> str:
        if "data_source" not in row:
            raise KeyError(f"RoutedReward needs row['data_source']; the row has keys {sorted(row)}")
        return str(row["data_source"])

    def __call__(self, response: str, row: dict) -> float:
        return self.route(self._row_source(row))(response, row)

    def extract_answer(self, response: str, row: dict) -> str | None:
        """The routed reward's extracted answer (for majority voting); None if it extracts none."""
        extract = getattr(self.route(self._row_source(row)), "extract_answer", None)
        return None if extract is None else extract(response, row)
