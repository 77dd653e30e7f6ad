"""--log-level and --log-format: the root logger's level and one JSON object a line, traceback included;
and what `kvferry serve` hands its children."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from kvferry.log_config import configure_logging, log_environment


pytestmark = pytest.mark.usefixtures("restore_logging")


def test_json_lines_at_the_chosen_level(capsys):
    configure_logging("warning", "json")
    log = logging.getLogger("kvferry.test")
    log.info("not shown")
    log.warning("disk %s", "full")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in lines] == [
        ("warning", "kvferry.test", "disk full"), ("error", "kvferry.test", "failed")]
    assert "RuntimeError: boom" in lines[1]["exception"] and lines[0]["time"].endswith("+00:00")


def test_bad_values_and_the_children_environment():
    with pytest.raises(ValueError, match="--log-level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="--log-format"):
        configure_logging("info", "xml")
    args = argparse.Namespace(log_level="debug", log_format="json")
    assert log_environment(args) == {"KVFERRY_LOG_LEVEL": "debug", "KVFERRY_LOG_FORMAT": "json"}
    assert log_environment(argparse.Namespace()) == {}
