"""The cluster token and mutual TLS on a real worker-style gRPC server (a KV receiver behind
``create_server``) and the real KV sender, on loopback."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvferry.engine.config import ConfigError, ModelConfig
from kvferry.proto import kv_transfer_pb2 as pb
from kvferry.proto import kv_transfer_pb2_grpc as pb_grpc
from kvferry.proto.cluster_security import ClusterSecurity, TLSFiles, bearer_matches, security_from_args
from kvferry.transport.base import FirstToken, KVFingerprint, KVTarget, TransferState
from kvferry.transport.grpc_transport import SERVICE_NAME, GrpcKVSender, add_kv_transfer_service, create_server
from kvferry.transport.receiver import KVReceiver
from tls_certs import TestCA

TOKEN = "s3cret-cluster-token"
SHAPE = (2, 8, 4, 2, 8)  # [2, num_blocks, block_size, num_kv_heads, head_dim]


def fingerprint() -> KVFingerprint:
    config = ModelConfig("LlamaForCausalLM", 100, 32, 64, 2, 4, 2, 8, 1e-5, 10000.0, 256, True, name="tiny")
    return KVFingerprint.from_model(config, torch.float32, SHAPE[2])


class Receiver:
    """A KV receiver behind a worker's server (``create_server``) with ``security``."""

    def __init__(self, security: ClusterSecurity) -> None:
        self.receiver = KVReceiver([torch.zeros(SHAPE) for _ in range(2)], fingerprint(), receiver_id="decode")
        self.server, _, port = create_server("127.0.0.1:0", [SERVICE_NAME], security=security)
        add_kv_transfer_service(self.server, self.receiver)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def push(self, sender_security: ClusterSecurity, request_id: str) -> GrpcKVSender:
        self.receiver.expect(request_id, [1, 2])
        sender = GrpcKVSender(fingerprint(), sender_id="prefill", security=sender_security)
        src = [torch.randn(SHAPE) for _ in range(2)]
        target = KVTarget(self.address, self.receiver.instance_id, timeout_s=5.0)
        self.handle = sender.send(target, request_id, src, [3, 4], FirstToken(7))
        self.handle.wait(5.0)
        sender.close()
        return self.handle

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def receivers():
    started: list[Receiver] = []

    def start(security: ClusterSecurity) -> Receiver:
        started.append(Receiver(security))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def test_bearer_matches_only_the_exact_secret():
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer {TOKEN}", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer "):
        assert not bearer_matches(header, TOKEN), header


def test_kv_push_needs_the_cluster_token(receivers):
    r = receivers(ClusterSecurity(token=TOKEN))
    refused = r.push(ClusterSecurity(), "no-token")
    assert refused.poll() is TransferState.FAILED and "UNAUTHENTICATED" in refused.error.message
    assert r.receiver.poll("no-token") is TransferState.PENDING  # the reservation was never touched
    wrong = r.push(ClusterSecurity(token="guess"), "wrong-token")
    assert wrong.poll() is TransferState.FAILED and "UNAUTHENTICATED" in wrong.error.message
    ok = r.push(ClusterSecurity(token=TOKEN), "with-token")
    assert ok.poll() is TransferState.DONE, ok.error
    assert torch.count_nonzero(r.receiver.kv_caches[0][:, [1, 2]]) > 0  # the KV arrived


def test_push_kv_itself_is_guarded_not_only_the_handshake(receivers):
    r = receivers(ClusterSecurity(token=TOKEN))
    r.receiver.expect("raw", [1])
    header = pb.KVChunk(header=pb.KVHeader(request_id="raw", num_layers=2, num_blocks=1))
    with grpc.insecure_channel(r.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.KVTransferStub(channel).PushKV(iter([header]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health checks stay open: probes need no secret.
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert r.receiver.poll("raw") is TransferState.PENDING


def test_mutual_tls_refuses_a_peer_without_a_valid_certificate(receivers, tmp_path):
    ca = TestCA(tmp_path)
    decode_cert, decode_key = ca.issue("decode")
    prefill_cert, prefill_key = ca.issue("prefill")
    r = receivers(ClusterSecurity(token=TOKEN, tls=TLSFiles(decode_cert, decode_key, str(ca.ca_path))))

    ok = r.push(ClusterSecurity(token=TOKEN, tls=TLSFiles(prefill_cert, prefill_key, str(ca.ca_path))), "tls")
    assert ok.poll() is TransferState.DONE, ok.error

    plain = r.push(ClusterSecurity(token=TOKEN), "plaintext")  # no TLS at all
    assert plain.poll() is TransferState.FAILED and "UNAVAILABLE" in plain.error.message

    other = TestCA(tmp_path, "other CA")  # a certificate, but not signed by the cluster's CA
    rogue_cert, rogue_key = other.issue("rogue")
    rogue = r.push(ClusterSecurity(token=TOKEN, tls=TLSFiles(rogue_cert, rogue_key, str(ca.ca_path))), "rogue")
    assert rogue.poll() is TransferState.FAILED and "UNAVAILABLE" in rogue.error.message

    # Server-authenticated TLS without a client certificate: the server requires one.
    creds = grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
    with grpc.secure_channel(r.address, creds) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for request_id in ("plaintext", "rogue"):
        assert r.receiver.poll(request_id) is TransferState.PENDING


def test_security_from_args_reads_the_environment_and_wants_all_tls_files(monkeypatch, tmp_path):
    import argparse

    from kvferry.proto.cluster_security import add_security_arguments

    parser = argparse.ArgumentParser()
    add_security_arguments(parser)
    monkeypatch.setenv("KVFERRY_CLUSTER_TOKEN", "from-env")
    assert security_from_args(parser.parse_args([])).token == "from-env"
    assert security_from_args(parser.parse_args(["--cluster-token", "flag"])).token == "flag"
    assert "from-env" not in repr(security_from_args(parser.parse_args([])))  # never logged by accident
    with pytest.raises(ConfigError, match="all three"):
        security_from_args(parser.parse_args(["--tls-cert", "a.pem"]))
    with pytest.raises(ConfigError, match="no such file"):
        security_from_args(parser.parse_args(["--tls-cert", "a", "--tls-key", "b", "--tls-ca", str(tmp_path)]))
