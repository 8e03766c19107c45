"""The metric keys of a training step: ``docs/metrics.md`` and ``archer.step_metrics.STEP_METRICS`` list
the same keys with the same conditions (runs check that the keys are logged: ``logged_keys``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from archer.algorithms import STAT_KEYS, Ratio
from archer.distributed import Collectives
from archer.step_metrics import STEP_METRICS, reduce_over_ranks

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_the_docs_list_the_keys_the_code_logs():
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", DOC.read_text(), flags=re.M)
    documented = {key: when.strip() for key, when in rows}
    assert documented == {key: when for key, (when, _) in STEP_METRICS.items()}
    assert {f"train/{key}" for key in STAT_KEYS} <= set(documented)


def test_ratios_are_reduced_as_sums_of_parts_and_empty_ones_are_left_out():
    values = reduce_over_ranks(
        {"a": Ratio.of(3.0, 4.0), "b": Ratio.of(0.0, 0.0)}, {"c": 7.0}, Collectives(), torch.device("cpu")
    )
    assert values == {"a": 0.75, "c": 7.0}
