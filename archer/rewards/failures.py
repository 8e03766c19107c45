"""The stop rule for a reward that fails on every call: ``model.max_failed_reward_steps``.

A reward that raises, returns a non-number or times out scores 0 and is counted
(``reward/errors``, ``reward/timeouts``); a step with some failures trains on. But when every call
of an RL step fails, on every rank, the step teaches nothing (all rewards 0, all advantages 0), and
when that goes on for ``limit`` steps in a row the reward is broken or the rows lack what it reads
(a wrong ``data.answer_key``): the run stops with :class:`RewardsFailedError` instead of training
to ``max_steps`` on zeros and exiting 0.
"""

from __future__ import annotations

import torch

from archer.distributed import Collectives
from archer.rewards.runner import RewardResult

__all__ = ["RewardsFailedError", "check_failed_reward_steps", "failed_reward_steps"]


class RewardsFailedError(RuntimeError):
    """Every reward call failed for ``model.max_failed_reward_steps`` RL steps in a row."""


def failed_reward_steps(in_a_row: int, rewards: RewardResult, collectives: Collectives) -> int:
    """RL steps in a row, this one included, in which every reward call of every rank failed.

    Args:
        in_a_row: the count before this step.
        rewards: this rank's reward calls of the step (refills included).
        collectives: the ranks' sums (every rank must call this, and gets the same count).
    """
    failed, calls = collectives.sum(
        torch.tensor([float(rewards.num_errors + rewards.num_timeouts), float(len(rewards.scores))])
    ).tolist()
    return in_a_row + 1 if calls > 0 and failed >= calls else 0


def check_failed_reward_steps(in_a_row: int, limit: int, rewards: RewardResult, timeout_s: float) -> None:
    """Raise :class:`RewardsFailedError` when ``in_a_row`` reached ``limit`` (0: never), quoting the
    first error of the last step."""
    if limit <= 0 or in_a_row < limit:
        return
    first = rewards.errors[0].splitlines()[0] if rewards.errors else f"the calls timed out ({timeout_s} s)"
    raise RewardsFailedError(
        f"every reward call failed in {in_a_row} RL steps in a row (model.max_failed_reward_steps = {limit}); "
        f"the last step's first error: {first}. Fix the reward or the rows it reads (data.answer_key), or "
        "set model.max_failed_reward_steps (0 never stops)"
    )
