"""The `kvferry` command line: `--version`, and help text on every flag of every sub-command (a flag
added without ``help=`` fails here, named with its sub-command)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import kvferry
from kvferry.cli import COMMANDS, add_command_arguments, load, main


def command_parsers():
    """(name, parser) for every sub-command and nested sub-command, built as `kvferry` builds them."""
    for name in COMMANDS:
        parser = argparse.ArgumentParser(prog=f"kvferry {name}")
        add_command_arguments(parser, load(name))
        yield from _with_nested(name, parser)


def _with_nested(name: str, parser: argparse.ArgumentParser):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _with_nested(f"{name} {sub_name}", sub)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvferry {kvferry.__version__}"


def test_version_from_the_installed_command():
    out = subprocess.run([sys.executable, "-m", "kvferry.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"kvferry {kvferry.__version__}"


def test_every_flag_of_every_command_has_help():
    missing, seen = [], 0
    for name, parser in command_parsers():
        parser.format_help()  # a help string with a bad %-format fails here, not in a user's terminal
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"kvferry {name} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 100  # every sub-command was walked, nested ones too
    assert not missing, "flags without help text: " + ", ".join(missing)


def test_every_command_has_a_summary():
    assert all(COMMANDS.values())
