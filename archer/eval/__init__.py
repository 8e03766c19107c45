"""``archer eval``: paper-style evaluation (avg@n, pass@k, maj@k with bootstrap intervals) of a
model folder or checkpoint on benchmark files, resumable from its ``samples.jsonl``."""

from archer.eval.config import PAPER_SAMPLING, EvalConfig
from archer.eval.records import SampleRecord, load_records
from archer.eval.results import dataset_results, format_markdown
from archer.eval.runner import evaluate
from archer.eval.stats import bootstrap_interval, maj_at_k, majority_vote_score, pass_at_k_of

__all__ = [
    "EvalConfig",
    "PAPER_SAMPLING",
    "SampleRecord",
    "bootstrap_interval",
    "dataset_results",
    "evaluate",
    "format_markdown",
    "load_records",
    "maj_at_k",
    "majority_vote_score",
    "pass_at_k_of",
]
