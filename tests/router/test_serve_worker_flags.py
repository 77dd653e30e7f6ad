"""`kvferry serve` passes every worker setting through: each flag `kvferry prefill` or `kvferry decode`
accepts is a serve flag too (or one serve sets itself, for a stated reason), and a value given to serve
reaches the command line of every worker that takes it, parsed there as the same value."""

from __future__ import annotations

import argparse

import pytest

from kvferry.router import launch_serve
from kvferry.router.serve_worker_flags import SET_BY_SERVE, passed_through, worker_parsers

def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    return parser.parse_args(["--device", "cpu", *argv])


def _sample(action: argparse.Action) -> tuple[list[str], object]:
    """A value for ``action`` that is not its default: (serve argv, the value a worker should parse)."""
    if isinstance(action, argparse._StoreTrueAction):
        return [action.option_strings[-1]], True
    if action.choices:
        value = next(c for c in action.choices if c != action.default)
        return [action.option_strings[-1], str(value)], value
    value = {int: 7, float: 2.5}.get(action.type, "x")
    return [action.option_strings[-1], str(value)], value


def _worker_flags():
    for role, parser in worker_parsers().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                yield role, action


@pytest.mark.parametrize("role, action", list(_worker_flags()), ids=lambda x: getattr(x, "dest", x))
def test_every_worker_flag_is_a_serve_flag_or_set_by_serve(role, action):
    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    assert action.dest in {a.dest for a in parser._actions} or action.dest in SET_BY_SERVE, f"kvferry serve has no {action.option_strings}"


@pytest.mark.parametrize("dest", sorted(passed_through()))
def test_a_passed_through_flag_reaches_each_worker_that_takes_it(dest):
    action, roles = passed_through()[dest]
    argv, value = _sample(action)
    for colocated in (False, True):
        cluster = launch_serve.build_cluster(serve_args(*argv, *(["--colocated"] if colocated else [])))
        parsers = worker_parsers()
        reached = set()
        for index, child in enumerate(cluster.workers):
            role = child.argv[child.argv.index("kvferry.cli") + 1]
            parsed = parsers[role].parse_args(child.argv[child.argv.index("kvferry.cli") + 2 :])
            expected = value + index if dest == "metrics_port" else value  # one port per worker
            if role in roles:
                assert getattr(parsed, dest) == expected, (child.name, child.argv)
                reached.add(role)
            else:
                assert not hasattr(parsed, dest)  # not its flag: not on its command line
        assert reached == ({"decode"} & set(roles) if colocated else set(roles))


def test_unset_worker_flags_are_not_passed():
    cluster = launch_serve.build_cluster(serve_args())
    flags = {a.option_strings[-1] for a, _ in passed_through().values()}
    for child in cluster.workers:
        assert not flags & set(child.argv), child.argv


def test_every_exception_is_a_real_worker_flag():
    dests = {action.dest for _, action in _worker_flags()}
    assert set(SET_BY_SERVE) <= dests, set(SET_BY_SERVE) - dests
