"""Verifiable rewards: math answers (math-verify), generated code (sandboxed tests), exact match.

Every reward follows :class:`Reward` (``reward(response, row) -> float``); :class:`RewardRunner`
scores batches in killable worker processes.
"""

from archer.rewards.base import Reward
from archer.rewards.code import CodeReward, TestResult, run_tests
from archer.rewards.exact import ExactMatchReward
from archer.rewards.math import MathReward
from archer.rewards.runner import RewardResult, RewardRunner

__all__ = ["CodeReward", "ExactMatchReward", "MathReward", "Reward", "RewardResult", "RewardRunner", "TestResult", "run_tests"]
