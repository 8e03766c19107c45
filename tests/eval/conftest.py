import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from make_fixtures import fixture_files  # noqa: E402,F401  (the data-format fixtures, as a pytest fixture)


def _save_like_model_parallel(module_state: dict, meta: dict, folder: Path) -> None:
    """A checkpoint folder as Lightning's ModelParallelStrategy (FSDP2) saves it by default: the module
    state and an optimizer state as torch.distributed.checkpoint shards, ``meta`` in ``meta.pt``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()  # not set up: one process, broadcast is the identity
    optimizer_state = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-6, "params": [0]}]}
    strategy.save_checkpoint({"state_dict": module_state, "optimizer_states": [optimizer_state], **meta}, folder)


@pytest.fixture
def save_like_model_parallel():
    """``save(module_state, meta, folder)``: write a sharded (FSDP2) checkpoint folder as training does."""
    return _save_like_model_parallel
