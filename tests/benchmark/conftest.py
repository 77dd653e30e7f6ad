"""A scripted OpenAI-compatible server on loopback, one per test module."""

from __future__ import annotations

import pytest

from scripted_openai_server import ScriptedServer


@pytest.fixture(scope="module")
def scripted():
    with ScriptedServer() as server:
        yield server
