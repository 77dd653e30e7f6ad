"""What both ways of starting a whole cluster share: `kvferry serve` (launch_serve.py, processes on
this machine) and `kvferry serve --ray` (deploy/ray_serve.py). A child process that dies with its
launcher, the router flags both pass on, the router's health check both wait on, and the curl example
both print. Both of those import this module; it imports neither (tests/test_layering.py: the edge has
no import cycle).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

logger = logging.getLogger("kvferry.serve")

POLL_S = 0.25
# Flags of `kvferry serve` that are the router's own, passed to `kvferry router` when given.
ROUTER_FLAGS = ("local_prefill", "local_prefill_max_tokens", "local_prefill_cached_fraction", "max_migrations",
                "worker_lease", "pair_failure_limit", "pair_cooldown")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launcher dies, however it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the launcher's own shutdown path still stops its children


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # this child's own, over the cluster's (threads)

    def start(self, env: dict[str, str]) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        self.process = subprocess.Popen(
            self.argv, env={**env, **self.env}, start_new_session=True, preexec_fn=_die_with_parent,
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float, force: threading.Event | None = None) -> bool:
        """Wait for the process to exit; False on timeout or when ``force`` is set (a second Ctrl-C)."""
        if self.process is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (force is not None and force.is_set()):
            try:
                self.process.wait(POLL_S)
                return True
            except subprocess.TimeoutExpired:
                continue
        return self.process.poll() is not None

    def kill(self) -> None:
        if self.alive:
            logger.warning("%s did not stop in time: killing it", self.name)
            self.process.kill()
            self.process.wait(10)


def router_flags_argv(args: argparse.Namespace) -> list[str]:
    """The router's own flags given to serve (``ROUTER_FLAGS``), as `kvferry router` takes them."""
    argv = []
    for flag in ROUTER_FLAGS:
        if getattr(args, flag, None) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def add_router_flag_arguments(parser: argparse.ArgumentParser) -> None:
    """Serve's copies of the router flags in ``ROUTER_FLAGS`` that placement.py does not add."""
    parser.add_argument("--max-migrations", type=int, default=None,
                        help="times one request may move to another worker after the one it ran on was lost "
                             "(the router's flag; default 2)")
    parser.add_argument("--worker-lease", type=float, default=None,
                        help="seconds without a heartbeat before the router drops a worker and moves its "
                             "requests (the router's flag; default 3)")
    parser.add_argument("--pair-failure-limit", type=int, default=None,
                        help="KV transfers in a row that may fail between a prefill and a decode worker before "
                             "the router stops placing requests on that pair for a cool-down (the router's flag; "
                             "default 2; 0: never)")
    parser.add_argument("--pair-cooldown", type=float, default=None,
                        help="seconds such a pair is left out before it is tried again, doubled each time it "
                             "fails again (the router's flag; default 5, at most 60)")


def http_ready(url: str) -> bool:
    """True once the router at ``url`` answers /health with 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def registered_workers(url: str) -> int:
    """How many workers the router at ``url`` has registered, by its /health body (also sent with a
    503 before it can serve); 0 while it does not answer."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError):
        return 0
    try:
        return sum(json.loads(body)["workers"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def curl_example(url: str, model: str, api_key: str = "") -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello in French."}],
                       "max_tokens": 32})
    auth = " -H 'Authorization: Bearer <your API key>'" if api_key else ""  # the key itself stays off the screen
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
