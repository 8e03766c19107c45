"""Shared fixtures: a tiny Qwen2 + char tokenizer written once per session (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from archer.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_untied"), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_tied"), seed=1, tie_word_embeddings=True)
