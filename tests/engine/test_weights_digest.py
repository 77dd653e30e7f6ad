"""The weights digest in the compatibility fingerprint: two checkpoints with one config and different
weights are different models to the KV handshake and to the router; the digest is cached per file and
recomputed when the file changes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kvferry.engine.loader import load_config_and_tokenizer, load_model
from kvferry.engine.loader import digest as digest_module
from kvferry.engine.loader.digest import weights_digest
from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.proto import router_pb2
from kvferry.proto.convert import fingerprint_from_proto, fingerprint_to_proto
from kvferry.router.registry import RegistrationError, RegistryConfig, WorkerRegistry


@pytest.fixture
def digest_cache(tmp_path, monkeypatch):
    """A private digest cache, so that this test neither reads nor writes the user's."""
    path = tmp_path / "digests.json"
    monkeypatch.setattr(digest_module, "default_cache_path", lambda: path)
    return path


def retrained_copy(src: str, dst: str) -> str:
    """The checkpoint at ``src`` with one weight changed by one step of its last bit: same config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (shard,) = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    tensors = load_file(os.path.join(dst, shard))
    name = "model.norm.weight"
    tensors[name] = torch.nextafter(tensors[name], torch.full_like(tensors[name], 10.0))
    save_file(tensors, os.path.join(dst, shard), metadata={"format": "pt"})
    return dst


def fingerprint_of(path: str) -> KVFingerprint:
    loaded = load_model(path, torch.float32)
    return KVFingerprint.from_model(loaded.config, torch.float32, 16)


def test_same_config_other_weights_is_another_model(make_hf_checkpoint, tmp_path, digest_cache):
    original = make_hf_checkpoint("qwen2")
    # Same directory name too: the model name comes from it.
    retrained = retrained_copy(original, str(tmp_path / "retrained" / os.path.basename(original)))
    a, a_again, b = fingerprint_of(original), fingerprint_of(original), fingerprint_of(retrained)
    assert a == a_again
    assert a.model_digest != b.model_digest
    assert [d.split(":")[0] for d in a.differences(b)] == ["model_digest"]
    # The router refuses the second one (as registration carries it), naming the digest.
    registry = WorkerRegistry(RegistryConfig())
    fp_a, fp_b = (fingerprint_from_proto(fingerprint_to_proto(fp, router_pb2.ModelFingerprint)) for fp in (a, b))
    registry.register(WorkerRole.DECODE, "127.0.0.1:1", fp_a, WorkerStats())
    with pytest.raises(RegistrationError, match="model_digest"):
        registry.register(WorkerRole.PREFILL, "127.0.0.1:2", fp_b, WorkerStats())
    # The router itself reads only the config: no digest, no weights read.
    assert load_config_and_tokenizer(original)[0].weights_digest == ""


def test_the_default_gguf_carries_its_digest(model_path, digest_cache):
    config = load_model(model_path, torch.float32, weights="quantized").config
    assert len(config.weights_digest) == digest_module.DIGEST_CHARS
    assert config.weights_digest == weights_digest([model_path])


def test_a_digest_is_hashed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = weights_digest([str(weights)], cache)
    hashed: list[str] = []
    real = digest_module.file_sha256
    monkeypatch.setattr(digest_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert weights_digest([str(weights)], cache) == first and hashed == []  # from the cache
    stat = os.stat(weights)
    weights.write_bytes(b"b" * 1000)  # same size; mtime put back as a careless copy would
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_digest([str(weights)], cache) != first and hashed == [str(weights)]
