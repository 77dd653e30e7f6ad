"""The `kvferry` command: one dict maps each sub-command to the module that implements it.

Each implementing module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their sub-command runs, so `kvferry generate` does not pay for the cluster's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import kvferry

COMMANDS = {
    "generate": ("kvferry.engine.cli_generate", "generate text for one prompt and print it"),
    "chat": ("kvferry.engine.cli_chat", "interactive chat with the model's chat template"),
    "serve": ("kvferry.router.launch_serve", "router + prefill and decode workers on this machine, supervised"),
    "router": ("kvferry.router.main", "run the router (HTTP OpenAI API + gRPC Generate)"),
    "prefill": ("kvferry.prefill_worker.main", "run a prefill worker that registers with a router"),
    "decode": ("kvferry.decode_worker.main", "run a decode worker that registers with a router"),
    "scale": ("kvferry.deploy.scale_cli", "resize the pools of a `kvferry serve --ray` deployment at run time"),
    "build-kernels": ("kvferry.kernels.build", "compile the C++ CPU kernels for this machine (make setup does)"),
    "bench": ("kvferry.benchmark.cli", "benchmark an OpenAI-compatible server: goodput sweeps and plots"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvferry", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvferry {kvferry.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
