"""Settings from a --config file and KVFERRY_* variables under the command line, on the real parsers of
`kvferry` commands: flag > environment > file > default, command sections, switches, lists, required
flags satisfied, and bad settings refused naming the file or the variable. Then a real `kvferry router`
process configured all three ways at once, logging JSON."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from kvferry.cli import add_command_arguments, load
from kvferry.config_file import apply_settings
from loopback import free_port
from waiting import wait_until


def parse(command: str, argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    """``argv`` as `kvferry COMMAND argv` parses it (nested sub-commands included)."""
    parser = argparse.ArgumentParser(prog=f"kvferry {command}")
    add_command_arguments(parser, load(command))
    apply_settings(parser, command, argv, environ or {})
    return parser.parse_args(argv)


@pytest.fixture
def config(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "kvferry.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_flag_over_environment_over_file_over_default(config):
    path = config("port: 8001\nmax-queue: 7\ngrpc_port: 50061\n")
    env = {"KVFERRY_PORT": "8002", "KVFERRY_SHUTDOWN_GRACE": "4.5"}
    args = parse("router", ["--config", path, "--port", "8003"], env)
    assert (args.port, args.max_queue, args.grpc_port, args.shutdown_grace) == (8003, 7, 50061, 4.5)
    assert parse("router", ["--config", path], env).port == 8002
    assert parse("router", ["--config", path]).port == 8001
    assert parse("router", []).port == 8000  # the flag's own default
    assert parse("router", [], {"KVFERRY_CONFIG": path}).max_queue == 7  # the file named in the environment


def test_command_sections_switches_and_lists(config):
    path = config("model: /models/a.gguf\nrouter:\n  port: 9000\ndecode:\n  colocated: true\n  "
                  "num-kv-blocks: 512\n  router: 10.0.0.1:50051\n")
    router = parse("router", ["--config", path])
    decode = parse("decode", ["--config", path])
    assert router.model == decode.model == "/models/a.gguf" and router.port == 9000
    assert decode.colocated is True and decode.num_kv_blocks == 512 and decode.router == "10.0.0.1:50051"
    assert parse("decode", ["--config", path], {"KVFERRY_COLOCATED": "off"}).colocated is False
    assert parse("decode", [], {"KVFERRY_NO_PREFIX_CACHING": "1"}).no_prefix_caching is True
    # a nested sub-command's flags; a required flag given in the environment; a repeated flag as a list
    plot = parse("bench", ["plot", "a.json", "b.json"], {"KVFERRY_OUT": "goodput.png"})
    assert plot.out == "goodput.png" and plot.results == ["a.json", "b.json"]
    serve = parse("bench", ["serve"], {"KVFERRY_SLO": "ttft:3000,tpot:100 ttft:5000,tpot:300"})
    assert serve.slo == ["ttft:3000,tpot:100", "ttft:5000,tpot:300"]
    path = config("bench:\n  slo:\n    - ttft:1000,tpot:50\n")
    assert parse("bench", ["--config", path, "serve"]).slo == ["ttft:1000,tpot:50"]


@pytest.mark.parametrize(
    "text, env, argv, message",
    [
        ("api-key: x\n", {}, [], "unknown setting 'api-key' for `kvferry decode`"),
        ("port: eighty\n", {}, [], "invalid value 'eighty' for --port"),
        ("kv-transport: carrier-pigeon\n", {}, [], "--kv-transport must be one of"),
        ("colocated: maybe\n", {}, [], "--colocated is a switch"),
        ("port: [1, 2]\n", {}, [], "--port takes one value"),
        ("- port\n", {}, [], "expected a mapping"),
        ("port: [\n", {}, [], "is not valid YAML"),
        ("", {"KVFERRY_PORT": "x1"}, [], "$KVFERRY_PORT: invalid value 'x1' for --port"),
        ("", {}, ["--config", "/nonexistent/kvferry.yaml"], "cannot read the config file"),
    ],
)
def test_bad_settings_exit_2_naming_where(config, capsys, text, env, argv, message):
    path = config(text)
    with pytest.raises(SystemExit) as exit_:
        parse("decode", argv or ["--config", path], env)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if not argv and not env:
        assert path in err  # the file is named


def test_a_router_process_takes_file_environment_and_flags(config):
    http_port, file_port, grpc_port = free_port(), free_port(), free_port()
    path = config(f"served-model-name: from-file\nport: {file_port}\nrouter:\n  log-format: json\n")
    env = {**os.environ, "KVFERRY_GRPC_PORT": str(grpc_port), "KVFERRY_LOG_LEVEL": "info"}
    process = subprocess.Popen([sys.executable, "-m", "kvferry.cli", "router", "--config", path, "--port",
                                str(http_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{http_port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None  # exited: fail below with its output

        assert wait_until(up, timeout_s=60)
        assert process.poll() is None, process.communicate()
        assert httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"] == "from-file"  # the file
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):  # the environment
            pass
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert f"grpc 127.0.0.1:{grpc_port}" in out
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert logs and all(set(entry) >= {"time", "level", "logger", "message"} for entry in logs), err
    assert any("shutting down" in entry["message"] for entry in logs), err
