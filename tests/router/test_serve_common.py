"""The router flags `kvferry serve` passes on (router/serve_common.py): each one given to serve reaches
the router's command line and the router parses it into its config; the pair flags' bad values are
refused with a message naming them."""

from __future__ import annotations

import argparse

import pytest

from kvferry.engine.config import ConfigError
from kvferry.router import launch_serve, main
from kvferry.router.serve_common import ROUTER_FLAGS, Child


def parse(add_arguments, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_router_flag_given_to_serve_reaches_the_router():
    given = ["--local-prefill", "always", "--local-prefill-max-tokens", "7", "--local-prefill-cached-fraction", "0.5",
             "--max-migrations", "3", "--worker-lease", "4.5", "--pair-failure-limit", "5", "--pair-cooldown", "2.5"]
    assert len(given) == 2 * len(ROUTER_FLAGS)  # one value per flag serve passes on
    cluster = launch_serve.build_cluster(parse(launch_serve.add_arguments, "--device", "cpu", *given))
    router_argv = cluster.router.argv[cluster.router.argv.index("router") + 1:]
    config = main.config_from_args(parse(main.add_arguments, *router_argv))
    assert (config.registry.pairs.failure_limit, config.registry.pairs.cooldown_s) == (5, 2.5)
    assert config.registry.lease_s == 4.5 and config.dispatch.max_migrations == 3
    assert (config.placement.mode, config.placement.local_prefill_max_tokens) == ("always", 7)
    assert config.placement.local_prefill_cached_fraction == 0.5


def test_the_router_defaults_when_serve_is_not_given_them():
    cluster = launch_serve.build_cluster(parse(launch_serve.add_arguments, "--device", "cpu"))
    assert not any(a.startswith("--pair-") for a in cluster.router.argv)
    config = main.config_from_args(parse(main.add_arguments))
    assert (config.registry.pairs.failure_limit, config.registry.pairs.cooldown_s) == (2, 5.0)
    assert config.registry.pairs.max_cooldown_s == 60.0


@pytest.mark.parametrize("argv", [["--pair-failure-limit", "-1"], ["--pair-cooldown", "0"]])
def test_bad_pair_settings_are_refused_naming_the_flag(argv):
    with pytest.raises(ConfigError, match="--pair-"):
        main.config_from_args(parse(main.add_arguments, *argv))


def test_a_cool_down_longer_than_the_usual_cap_raises_the_cap():
    config = main.config_from_args(parse(main.add_arguments, "--pair-cooldown", "120"))
    assert config.registry.pairs.max_cooldown_s == 120



def test_each_role_gets_its_own_thread_count_over_the_split(tmp_path):
    """--prefill-threads / --decode-threads reach the real processes' environment; a role without its
    own count keeps --threads (here 3)."""
    cluster = launch_serve.build_cluster(parse(launch_serve.add_arguments, "--device", "cpu", "--threads", "3",
                                               "--prefill-threads", "2"))
    seen = {}
    for child in cluster.workers:  # the same Child, its command swapped for a probe of its environment
        out = tmp_path / child.name
        probe = Child(child.name, ["sh", "-c", f"echo $KVFERRY_NUM_THREADS > {out}"], env=child.env)
        probe.start(cluster.env)
        assert probe.wait(30)
        seen[child.name] = out.read_text().strip()
    assert seen == {"prefill-1": "2", "decode-1": "3"}
    colocated = launch_serve.build_cluster(parse(launch_serve.add_arguments, "--device", "cpu", "--colocated",
                                                 "--decode-threads", "2", "--prefill-threads", "1"))
    assert [c.env for c in colocated.workers] == [{"KVFERRY_NUM_THREADS": "2"}]  # a colocated worker decodes
