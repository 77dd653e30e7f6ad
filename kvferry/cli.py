"""The `kvferry` command: one dict of sub-commands, and ``load``, which imports the module that runs one.

Each implementing module exposes ``add_arguments(parser)`` and ``run(args) -> int``; a module is
imported only when its sub-command runs, so `kvferry generate` does not pay for the cluster's imports.
Every sub-command also gets ``--config FILE`` and a ``KVFERRY_*`` variable per flag (config_file.py),
and ``--log-level`` / ``--log-format`` (log_config.py), set up before it runs.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

import kvferry
from kvferry.commands import COMMANDS
from kvferry.config_file import add_config_argument, apply_settings
from kvferry.log_config import add_logging_arguments, configure_logging


def load(command: str) -> ModuleType:
    """The module that runs ``command`` (a key of ``COMMANDS``), imported now."""
    match command:
        case "generate":
            from kvferry.engine import cli_generate as module
        case "chat":
            from kvferry.engine import cli_chat as module
        case "serve":
            from kvferry.router import launch_serve as module
        case "router":
            from kvferry.router import main as module
        case "prefill":
            from kvferry.prefill_worker import main as module
        case "decode":
            from kvferry.decode_worker import main as module
        case "scale":
            from kvferry.deploy import scale_cli as module
        case "status":
            from kvferry import status_cli as module
        case "build-kernels":
            from kvferry.kernels import build as module
        case "bench":
            from kvferry.benchmark import cli as module
        case _:
            raise KeyError(command)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvferry", description="kvferry: disaggregated prefill/decode LLM serving (router, workers, tools)",
        epilog="`kvferry COMMAND --help` lists a command's flags; each can also come from its KVFERRY_* "
               "variable or a --config file")
    parser.add_argument("--version", action="version", version=f"kvferry {kvferry.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            module = load(name)
            add_command_arguments(sub, module)
            sub.set_defaults(_module=module)
            apply_settings(sub, name, argv[1:])  # file and environment, under the command line
            chosen_parser = sub
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        chosen_parser.error(str(exc))
    return int(args._module.run(args) or 0)


def add_command_arguments(parser: argparse.ArgumentParser, module) -> None:
    """A sub-command's own flags, then the ones every sub-command has."""
    module.add_arguments(parser)
    add_logging_arguments(parser)
    add_config_argument(parser)
    parser.epilog = ("Every flag can also be set in the environment (--max-model-len as KVFERRY_MAX_MODEL_LEN) "
                     "or in the --config file (max-model-len: 4096); the command line wins, then the "
                     "environment, then the file.")


if __name__ == "__main__":
    sys.exit(main())
