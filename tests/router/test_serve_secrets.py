"""`kvferry serve --api-key --cluster-token`: the secrets reach every child in its environment, never on a
command line (which any local user can read), and the printed example carries the header, not the key."""

from __future__ import annotations

import argparse

from kvferry.proto.cluster_security import TOKEN_ENV
from kvferry.router import launch_serve
from kvferry.router.auth import API_KEY_ENV


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    return parser.parse_args(["--device", "cpu", *argv])


def test_secrets_go_to_the_children_in_the_environment_only(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cluster = launch_serve.build_cluster(serve_args("--api-key", "sk-abc", "--cluster-token", "tok-xyz"))
    assert cluster.env[API_KEY_ENV] == "sk-abc" and cluster.env[TOKEN_ENV] == "tok-xyz"
    assert len(cluster.children) >= 3  # the router and its workers all start with this environment
    for child in cluster.children:
        assert not any("sk-abc" in a or "tok-xyz" in a for a in child.argv), child.argv
    example = launch_serve.curl_example(cluster.http_url, "m", cluster.env[API_KEY_ENV])
    assert "Authorization: Bearer" in example and "sk-abc" not in example


def test_without_the_flags_nothing_is_added(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cluster = launch_serve.build_cluster(serve_args())
    assert API_KEY_ENV not in cluster.env and TOKEN_ENV not in cluster.env
    assert "Authorization" not in launch_serve.curl_example(cluster.http_url, "m")
