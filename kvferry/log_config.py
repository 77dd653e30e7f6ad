"""Logging for every `kvferry` command: ``--log-level`` and ``--log-format text|json`` (one JSON object
a line: time, level, logger, message, and the traceback if any), set up once on the root logger before
the command runs. `kvferry serve` hands both to its children as their KVFERRY_LOG_* variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Both flags, unless the command defines one of them itself (`kvferry router` has --log-level)."""
    have = {s for action in parser._actions for s in action.option_strings}
    if "--log-level" not in have:
        parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                            help="least severe messages logged (default info: one line per request)")
    if "--log-format" not in have:
        parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                            help="text, or json: one JSON object a line for log collectors (default text)")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger at ``level``, to stderr, as text or JSON; replaces any handler set before, so a
    command's own ``logging.basicConfig`` afterwards changes nothing."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables that give a child process this process's logging (`kvferry serve`'s workers)."""
    return {f"KVFERRY_{name.upper()}": str(getattr(args, name))
            for name in ("log_level", "log_format") if getattr(args, name, None)}
