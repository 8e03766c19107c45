import os

import pytest

from archer.tiny import write_tiny_model

# Tests share 2 cores with reward workers; keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 + character tokenizer, written once per test session."""
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-model")))
