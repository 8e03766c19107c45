"""Reward for reasoning-gym rows: the task family's own ``score_answer``.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (``pip install reasoning-gym``, or
``bash install.sh evals``) generates verifiable problems of 100+ families, each with its own
scorer ``score_answer(answer, entry) -> float`` in [0, 1] (exact match, numeric tolerance, any
valid solution of a puzzle, partial credit ``len(answer) / len(response)`` when the answer is only
contained in the response, ...). Rows come from :class:`archer.data.tasks.ReasoningGymTask`:
``{"prompt": question, "answer", "metadata", "reasoning_gym": {"dataset", "config", "seed"},
"data_source": "reasoning_gym/<dataset>"}``.

The reward extracts the answer from the response (after the reasoning block): the content of
the last ``<answer>…</answer>`` (reasoning-gym's convention, its ``extract_answer``; no tag: no
answer, 0), or with ``answer_tag=None`` the whole remaining response, stripped. It rebuilds the
family's data set from the row's ``dataset``, ``config`` and ``seed`` (once per worker process
and setting: several scorers read their configuration) and returns
``dataset.score_answer(answer, {"question": prompt, "answer", "metadata"})``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from archer.rewards.reasoning import DEFAULT_THINK_END, after_thinking

__all__ = ["REASONING_GYM_KEY", "INSTALL_REASONING_GYM", "ReasoningGymReward", "reasoning_gym_dataset"]

REASONING_GYM_KEY = "reasoning_gym"
"""Row key holding ``{"dataset": family, "config": {...}, "seed": int}``."""

INSTALL_REASONING_GYM = "pip install reasoning-gym (or: bash install.sh evals)"


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(f"reasoning-gym is not installed: {INSTALL_REASONING_GYM}") from error
    return reasoning_gym


@lru_cache(maxsize=64)
def _cached_dataset(name: str, config_json: str, seed: int) -> Any:
    return _import_reasoning_gym().create_dataset(name, seed=seed, **json.loads(config_json))


def reasoning_gym_dataset(name: str, config: dict[str, Any], seed: int) -> Any:
    """reasoning-gym's data set ``name`` built with ``config`` and ``seed`` (cached in this process:
    some families load word lists or puzzles when built; data sets are not kept on the reward, which
    is pickled to worker processes and whose settings an eval records)."""
    return _cached_dataset(name, json.dumps(config, sort_keys=True), seed)


class ReasoningGymReward:
    """Scores a response with its row's reasoning-gym family's ``score_answer``.

    Args:
        answer_tag: the answer is the content of the last ``<answer_tag>…</answer_tag>``; None: the
            whole response (after the reasoning block), stripped — for models prompted to answer
            directly, such as the CPU quickstart's.
        think_end: end-of-thinking marker; only the text after its last occurrence is read (all of
            it when absent). None: always the whole response.
    """

    def __init__(self, answer_tag: str | None = "answer", think_end: str | None = DEFAULT_THINK_END) -> None:
        self.answer_tag = answer_tag
        self.think_end = think_end

    def extract_answer(self, response: str, row: dict) -> str | None:
        """The answer ``score_answer`` is given: None when the tag is missing."""
        text = after_thinking(response, self.think_end)
        if self.answer_tag is None:
            return text.strip()
        return _import_reasoning_gym().utils.extract_answer(text, tag_name=self.answer_tag)

    def __call__(self, response: str, row: dict) -> float:
        spec = row.get(REASONING_GYM_KEY)
        if not isinstance(spec, dict) or not {"dataset", "config", "seed"} <= spec.keys():
            raise KeyError(f"ReasoningGymReward needs row[{REASONING_GYM_KEY!r}] = {{'dataset', 'config', 'seed'}} "
                           f"(rows of archer.data.tasks.ReasoningGymTask); the row has keys {sorted(row)}")
        dataset = reasoning_gym_dataset(spec["dataset"], spec["config"], spec["seed"])
        entry = {"question": row["prompt"], "answer": row["answer"], "metadata": row["metadata"]}
        return float(dataset.score_answer(self.extract_answer(response, row), entry))
