"""Settings for a `kvferry` command from outside its command line: a YAML file (``--config FILE``) and
one environment variable per flag (``--num-kv-blocks`` is ``KVFERRY_NUM_KV_BLOCKS``). A flag on the
command line wins over its variable, the variable over the file, the file over the flag's default.

The file is a mapping of flag names (``num-kv-blocks`` or ``num_kv_blocks``) to values; a mapping
under a command's name (``router:``, ``decode:``) applies to that command only, so one file can hold a
whole cluster's settings. Anything the command does not know, and any value its flag would refuse, is
an error naming the file or the variable. Values are converted and checked as the flag's own
``type`` and ``choices`` would; switches (``--colocated``) take true/false (or 1/0, yes/no, on/off).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Iterator, Mapping
from typing import Any

from kvferry.commands import COMMANDS

ENV_PREFIX = "KVFERRY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class SettingError(ValueError):
    """A setting from the file or the environment that the command refuses; the message says where."""


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"YAML file of settings: flag names to values, and a section per command "
                             f"(${CONFIG_ENV}); flags and KVFERRY_* variables override it")


def apply_settings(parser: argparse.ArgumentParser, command: str, argv: list[str],
                   environ: Mapping[str, str] | None = None) -> None:
    """Make the file's and the environment's values the defaults of ``parser``'s flags (and those of
    the nested sub-command ``argv`` chooses); the command line still overrides them. Errors exit
    through ``parser.error`` (status 2, with the usage)."""
    environ = os.environ if environ is None else environ
    try:
        _apply(parser, command, argv, environ)
    except SettingError as exc:
        parser.error(str(exc))


def _apply(parser: argparse.ArgumentParser, command: str, argv: list[str], environ: Mapping[str, str]) -> None:
    owners = {action.dest: (p, action) for p in _chosen_parsers(parser, argv) for action in _options(p)}
    path = _config_path(argv) or environ.get(CONFIG_ENV)
    values: dict[str, Any] = {}
    if path:
        for key, raw in load_config(path, command).items():
            dest = key.replace("-", "_")
            if dest not in owners or dest == "config":
                raise SettingError(f"{path}: unknown setting {key!r} for `kvferry {command}` (settings of other "
                                   f"commands go under a section named after the command)")
            values[dest] = convert(owners[dest][1], raw, f"{path}: {key}")
    for dest, (_, action) in owners.items():
        name = env_name(action)
        if name in environ and dest != "config":
            values[dest] = convert(action, environ[name], f"${name}")
    for dest, value in values.items():
        owner, action = owners[dest]
        owner.set_defaults(**{dest: value})
        action.required = False  # given, though not on the command line


def load_config(path: str, command: str) -> dict[str, Any]:
    """The file's settings for ``command``: its top level, then the command's section over it."""
    import yaml  # only when a file is given

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise SettingError(f"cannot read the config file: {exc}") from None
    except yaml.YAMLError as exc:
        raise SettingError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    # A mapping under a command's name is a section; a plain value is a flag (`router: host:port`).
    sections = {k for k, v in data.items() if k in COMMANDS and isinstance(v, dict)}
    settings = {str(k): v for k, v in data.items() if k not in sections}
    section = data.get(command) if command in sections else {}
    settings.update({str(k): v for k, v in section.items()})
    return settings


def convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """``raw`` (a YAML value, or an environment variable's text) as the flag would parse it."""
    flag = "/".join(action.option_strings)
    if isinstance(action, _SWITCHES):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise SettingError(f"{where}: {flag} is a switch: give true or false, got {raw!r}")
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if many:
        items = raw if isinstance(raw, list) else shlex.split(raw) if isinstance(raw, str) else [raw]
        return [_one(action, item, where, flag) for item in items]
    if isinstance(raw, (list, dict)):
        raise SettingError(f"{where}: {flag} takes one value, got {raw!r}")
    return _one(action, raw, where, flag)


def _one(action: argparse.Action, raw: Any, where: str, flag: str) -> Any:
    if isinstance(raw, bool) or raw is None:
        raise SettingError(f"{where}: {flag} takes a value, got {raw!r}")
    text = str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise SettingError(f"{where}: invalid value {raw!r} for {flag} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise SettingError(f"{where}: {flag} must be one of {', '.join(map(str, action.choices))}, got {raw!r}")
    return value


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action


def _chosen_parsers(parser: argparse.ArgumentParser, argv: list[str]) -> Iterator[argparse.ArgumentParser]:
    """``parser``, and the nested sub-command's parser that ``argv`` names (`kvferry bench serve`)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((a for a in argv if a in action.choices), None)
            if chosen is not None:
                yield from _chosen_parsers(action.choices[chosen], argv[argv.index(chosen) + 1:])


def _config_path(argv: list[str]) -> str | None:
    """``--config FILE`` / ``--config=FILE`` from the command line, before the full parse."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
