"""The worker settings `kvferry serve` passes through: every flag of `kvferry prefill` and `kvferry decode`
that serve does not set itself is a serve flag of the same name, handed to each worker that takes it.

The flags are read from the workers' own parsers, so a flag added to a worker reaches `kvferry serve`
with no change here. A passed-through flag defaults to unset: a worker gets it only when it was given
(on the command line, as its ``KVFERRY_*`` variable or in the ``--config`` file), and otherwise keeps its
own default. ``--metrics-port P`` gives the workers P, P+1, ... (they share the host).
"""

from __future__ import annotations

import argparse

# Worker flags serve sets itself (dest -> why), so they are not passed through as they are.
SET_BY_SERVE = {
    "router": "the router serve starts",
    "host": "serve's --host",
    "port": "0: each worker takes a free port",
    "advertise_host": "the workers share serve's --host",
    "name": "prefill-N, decode-N, colocated-N: stable across restarts",
    "colocated": "serve's --colocated",
    "model": "serve's --model (the router's too)",
    "max_model_len": "serve's --max-model-len (the router's too)",
    "profile": "serve's --profile (the router's too)",
    "ttft_slo_ms": "serve's --ttft-slo-ms (the router's too)",
    "tpot_slo_ms": "serve's --tpot-slo-ms (the router's too)",
    "dtype": "serve's --dtype",
    "weights": "serve's --weights",
    "prompt_weights": "serve's --prompt-weights",
    "kv_transport": "serve's --kv-transport",
    "device": "serve's --device, resolved before anything starts",
    "kv_cache_bytes": "serve's --kv-cache-bytes",
    "gpu_memory_utilization": "serve's --gpu-memory-utilization",
    "shutdown_grace": "serve's --shutdown-grace is the router's; the workers keep their own",
    "cluster_token": "serve's --cluster-token, given in the environment (never on a command line)",
    "tls_cert": "one host on loopback: mutual TLS is for workers on other hosts (docs/HOMELAB.md)",
    "tls_key": "as --tls-cert",
    "tls_ca": "as --tls-cert",
    "tls_server_name": "as --tls-cert",
}
OFFSET_PER_WORKER = {"metrics_port"}  # one port per worker on the shared host


def worker_parsers() -> dict[str, argparse.ArgumentParser]:
    """``kvferry prefill`` and ``kvferry decode``'s own flags (colocated workers are decode processes)."""
    from kvferry.decode_worker import main as decode_main
    from kvferry.prefill_worker import main as prefill_main

    parsers = {}
    for role, module in (("prefill", prefill_main), ("decode", decode_main)):
        parsers[role] = argparse.ArgumentParser(prog=f"kvferry {role}")
        module.add_arguments(parsers[role])
    return parsers


def passed_through() -> dict[str, tuple[argparse.Action, tuple[str, ...]]]:
    """dest -> (the worker flag's action, the roles that take it), for every flag serve passes on."""
    found: dict[str, tuple[argparse.Action, tuple[str, ...]]] = {}
    for role, parser in worker_parsers().items():
        for action in parser._actions:  # argparse has no public list of a parser's flags
            if not action.option_strings or action.dest in SET_BY_SERVE or action.dest == "help":
                continue
            first, roles = found.get(action.dest, (action, ()))
            found[action.dest] = (first, (*roles, role))
    return found


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("worker settings", "passed to each worker that takes them (unset: the worker's default)")
    for dest, (action, roles) in passed_through().items():
        who = "every worker" if len(roles) == 2 else f"the {roles[0]} workers"
        text = f"{action.help} [{who}]" if action.help else f"[{who}]"
        if isinstance(action, argparse._StoreTrueAction):
            group.add_argument(*action.option_strings, dest=dest, action="store_true", default=None, help=text)
        else:
            group.add_argument(*action.option_strings, dest=dest, type=action.type, choices=action.choices,
                               default=None, metavar=action.metavar, help=text)


def worker_argv(args: argparse.Namespace, role: str, index: int) -> list[str]:
    """The passed-through flags given to serve, for worker number ``index`` of ``role`` ("prefill" or
    "decode"; a colocated worker is a decode process)."""
    argv: list[str] = []
    for dest, (action, roles) in passed_through().items():
        value = getattr(args, dest, None)
        if value is None or role not in roles:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value + index if dest in OFFSET_PER_WORKER else value)]
    return argv
