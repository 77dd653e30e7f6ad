"""The `ray up` cluster files in deploy/ray pass Ray's own validation (the steps `ray up` runs before it
touches a machine: provider preparation, defaults, the JSON schema), and give each node its kvferry
role resource and start kvferry where the docs say."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_FILES = Path(__file__).resolve().parents[2] / "deploy" / "ray"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER_FILES / name).read_text())


def validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["homelab.yaml", "cloud-gpu.yaml"])
def test_cluster_file_passes_rays_validation(name):
    validated(load(name))


@pytest.mark.parametrize("name", ["homelab.yaml", "cloud-gpu.yaml"])
def test_validation_catches_a_broken_file(name):
    config = load(name)
    config["idle_timeout_minutes"] = "soon"  # the schema wants a number
    with pytest.raises(jsonschema.ValidationError):
        validated(config)


def test_homelab_gives_the_head_prefill_and_the_workers_decode():
    config = validated(load("homelab.yaml"))
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and json.dumps({"kvferry_prefill": 1}) in head
    assert "kvferry serve --ray --ray-address auto --elastic --host 0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in workers and json.dumps({"kvferry_decode": 1}) in workers
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == config["max_workers"]


def test_cloud_node_types_carry_gpus_and_roles():
    types = validated(load("cloud-gpu.yaml"))["available_node_types"]
    assert types["prefill_gpu"]["resources"]["kvferry_prefill"] == 1 and types["prefill_gpu"]["resources"]["GPU"] == 1
    assert types["decode_gpu"]["resources"]["kvferry_decode"] == 1 and types["decode_gpu"]["resources"]["GPU"] == 1
    assert "GPU" not in types["head"]["resources"]
