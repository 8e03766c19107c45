"""Verifiable rewards: math answers (math-verify), generated code (sandboxed tests; code completions
such as HumanEval's), exact match, reasoning-gym's scorers, and routing by ``data_source`` between them.

Every reward follows :class:`Reward` (``reward(response, row) -> float``), or is a
:class:`BatchedReward` that scores many at once (``score_batch(responses, rows) -> list[float]``);
:class:`WeightedSum` combines several. :class:`RewardRunner` scores batches in killable worker
processes. Rewards grade the text after the end-of-thinking marker (``think_end``, default
``</think>``) when the response has one.
"""

from archer.rewards.base import BatchedReward, Reward, is_batched
from archer.rewards.code import CodeReward, TestResult, run_tests
from archer.rewards.completion_code import CompletionCodeReward
from archer.rewards.exact import ExactMatchReward
from archer.rewards.math import MathReward
from archer.rewards.reasoning_gym import ReasoningGymReward
from archer.rewards.routed import RoutedReward
from archer.rewards.failures import RewardsFailedError
from archer.rewards.runner import RewardResult, RewardRunner
from archer.rewards.weighted import WeightedSum

__all__ = [
    "BatchedReward",
    "CodeReward",
    "CompletionCodeReward",
    "ExactMatchReward",
    "MathReward",
    "ReasoningGymReward",
    "Reward",
    "RewardResult",
    "RewardRunner",
    "RewardsFailedError",
    "RoutedReward",
    "TestResult",
    "WeightedSum",
    "is_batched",
    "run_tests",
]
