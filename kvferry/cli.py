"""The `kvferry` command: one dict maps each sub-command to the module that implements it.

Each implementing module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their sub-command runs, so `kvferry generate` does not pay for the cluster's imports.
Every sub-command also gets ``--config FILE`` and a ``KVFERRY_*`` variable per flag (config_file.py),
and ``--log-level`` / ``--log-format`` (log_config.py), set up before it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import kvferry
from kvferry.config_file import add_config_argument, apply_settings
from kvferry.log_config import add_logging_arguments, configure_logging

COMMANDS = {
    "generate": ("kvferry.engine.cli_generate", "generate text for one prompt and print it"),
    "chat": ("kvferry.engine.cli_chat", "interactive chat with the model's chat template"),
    "serve": ("kvferry.router.launch_serve", "router + prefill and decode workers on this machine, supervised"),
    "router": ("kvferry.router.main", "run the router (HTTP OpenAI API + gRPC Generate)"),
    "prefill": ("kvferry.prefill_worker.main", "run a prefill worker that registers with a router"),
    "decode": ("kvferry.decode_worker.main", "run a decode worker that registers with a router"),
    "scale": ("kvferry.deploy.scale_cli", "resize the pools of a `kvferry serve --ray` deployment at run time"),
    "status": ("kvferry.status_cli", "the router's workers: roles, KV cache in use, load, heartbeats"),
    "build-kernels": ("kvferry.kernels.build", "compile the C++ CPU kernels for this machine (make setup does)"),
    "bench": ("kvferry.benchmark.cli", "benchmark an OpenAI-compatible server: goodput sweeps and plots"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvferry", description="kvferry: disaggregated prefill/decode LLM serving (router, workers, tools)",
        epilog="`kvferry COMMAND --help` lists a command's flags; each can also come from its KVFERRY_* "
               "variable or a --config file")
    parser.add_argument("--version", action="version", version=f"kvferry {kvferry.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
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
