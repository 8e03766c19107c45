"""Prompt data for RL: synthetic verifiable tasks, validated file rows, and the ``PromptDataModule``."""

from archer.data.benchmarks import BENCHMARKS, benchmark_rows
from archer.data.datamodule import PromptDataModule, render_prompt, render_row
from archer.data.rows import BadRowError, RowFields, read_rows
from archer.data.stream import PromptStream
from archer.data.tasks import (
    AdditionTask,
    CountdownTask,
    DigitCopyTask,
    DigitSumTask,
    ReverseTask,
    SyntheticTask,
)

__all__ = [
    "PromptDataModule",
    "render_prompt",
    "render_row",
    "BENCHMARKS",
    "benchmark_rows",
    "BadRowError",
    "RowFields",
    "read_rows",
    "PromptStream",
    "SyntheticTask",
    "DigitCopyTask",
    "DigitSumTask",
    "AdditionTask",
    "ReverseTask",
    "CountdownTask",
]
