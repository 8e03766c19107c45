"""Verifiable rewards: math answers (math-verify), generated code (sandboxed tests), exact match,
and routing by ``data_source`` between them.

Every reward follows :class:`Reward` (``reward(response, row) -> float``); :class:`RewardRunner`
scores batches in killable worker processes. Rewards grade the text after the end-of-thinking
marker (``think_end``, default ``</think>``) when the response has one.
"""

from archer.rewards.base import Reward
from archer.rewards.code import CodeReward, TestResult, run_tests
from archer.rewards.exact import ExactMatchReward
from archer.rewards.math import MathReward
from archer.rewards.routed import RoutedReward
from archer.rewards.runner import RewardResult, RewardRunner

__all__ = [
    "CodeReward",
    "ExactMatchReward",
    "MathReward",
    "Reward",
    "RewardResult",
    "RewardRunner",
    "RoutedReward",
    "TestResult",
    "run_tests",
]
