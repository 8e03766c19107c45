"""``archer eval``: paper-style evaluation (avg@n, pass@k, maj@k with bootstrap intervals) of a
model folder or checkpoint on benchmark files or built-in benchmarks, resumable from its
``samples.jsonl``; several models compared in one table with paired differences."""

from archer.eval.compare import compare_evals, evaluate_models, write_table
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
    "compare_evals",
    "dataset_results",
    "evaluate",
    "evaluate_models",
    "format_markdown",
    "load_records",
    "maj_at_k",
    "majority_vote_score",
    "pass_at_k_of",
    "write_table",
]
