"""Scripted prefill and decode workers for router tests: real gRPC servers on loopback speaking
worker.proto and registering with the router over router.proto, but producing a fixed token script
instead of running a model, so the router's own behaviour (placement, queueing, ordering, stop strings,
aborts, disconnects) is tested in seconds. The real workers are tested end to end in tests/cluster;
test_stand_in_workers.py checks that the scripted decode worker reserves and frees as the real one does.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from kvferry.proto import kv_transfer_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity

BLOCK_SIZE = 16
FINGERPRINT = router_pb2.ModelFingerprint(
    model_name="SmolLM2-135M-Instruct.Q4_1", dtype="float32", block_size=BLOCK_SIZE, num_layers=30,
    num_kv_heads=3, head_dim=64, vocab_size=49152, max_model_len=8192, protocol_version=1,
)


@dataclass
class Reservation:
    request_id: str
    prompt: list[int]
    max_tokens: int
    num_blocks: int
    logprobs: int | None
    local: bool
    kv_arrived: threading.Event = field(default_factory=threading.Event)
    aborted: threading.Event = field(default_factory=threading.Event)


class ScriptedDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """Output token k of every request is ``script[k]``; one token per ``token_delay`` seconds."""

    def __init__(self, script: list[int], total_blocks: int = 64, token_delay: float = 0.0,
                 eos: int = 2, repeat_first: bool = False, reserve_delay: float = 0.0) -> None:
        self.script = script
        self.reserve_delay = reserve_delay  # seconds each Reserve takes: makes a burst's Reserves overlap
        self.total_blocks = total_blocks
        self.token_delay = token_delay
        self.eos = eos
        self.repeat_first = repeat_first  # stream token 0 too (the router must drop the duplicate)
        self.lock = threading.Lock()
        self.reservations: dict[str, Reservation] = {}
        self.used_blocks = 0
        self.aborted: list[str] = []
        self.served: list[str] = []
        self.refused = 0
        self.address = ""

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def _release(self, request_id: str) -> None:
        with self.lock:
            r = self.reservations.pop(request_id, None)
            if r is not None:
                self.used_blocks -= r.num_blocks

    def Reserve(self, request, context):
        need = -(-len(request.prompt_token_ids) // BLOCK_SIZE)  # the prompt's blocks, as the real worker reserves
        time.sleep(self.reserve_delay)
        with self.lock:
            if need > self.free_blocks:
                self.refused += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"need {need} blocks, {self.free_blocks} free")
            self.used_blocks += need
            logprobs = request.sampling.logprobs if request.sampling.HasField("logprobs") else None
            r = Reservation(request.request_id, list(request.prompt_token_ids), request.sampling.max_tokens,
                            need, logprobs, request.prefill_locally)
            self.reservations[request.request_id] = r
            self.served.append(request.request_id)
        if r.local:
            r.kv_arrived.set()
        return worker_pb2.ReserveResponse(block_ids=list(range(need)), receiver_instance_id="i1",
                                          lease_ms=5000, kv_address=self.address)

    def _logprobs(self, r: Reservation, k: int) -> list[kv_transfer_pb2.TokenLogprobs]:
        if r.logprobs is None:
            return []
        top = [self.script[k]] + [t for t in (100, 200, 300) if t != self.script[k]]
        return [kv_transfer_pb2.TokenLogprobs(logprob=-0.5 - k, top_token_ids=top[: r.logprobs],
                                              top_logprobs=[-0.5 - k - j for j in range(r.logprobs)])]

    def Stream(self, request, context):
        r = self.reservations.get(request.request_id)
        if r is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such request")
        try:
            if not r.kv_arrived.wait(10):
                yield worker_pb2.TokenEvent(request_id=r.request_id, index=0, finish_reason="error",
                                            error="KV never arrived")
                return
            start = 0 if (r.local or self.repeat_first) else 1
            for k in range(start, min(r.max_tokens, len(self.script))):
                if r.aborted.wait(self.token_delay) or not context.is_active():
                    yield worker_pb2.TokenEvent(request_id=r.request_id, index=k, finish_reason="abort")
                    return
                token = self.script[k]
                last = token == self.eos or k + 1 >= r.max_tokens or k + 1 >= len(self.script)
                reason = ("stop" if token == self.eos else "length") if last else ""
                yield worker_pb2.TokenEvent(request_id=r.request_id, index=k, token_ids=[token],
                                            logprobs=self._logprobs(r, k), finish_reason=reason)
                if last:
                    return
            if r.max_tokens <= 1 and start == 1:  # finished with the prefill's token
                reason = "stop" if self.script[0] == self.eos else "length"
                yield worker_pb2.TokenEvent(request_id=r.request_id, index=1, finish_reason=reason)
        finally:
            self._release(r.request_id)

    def Abort(self, request, context):
        r = self.reservations.get(request.request_id)
        with self.lock:
            self.aborted.append(request.request_id)
        if r is not None:
            r.aborted.set()
            self._release(request.request_id)
        return worker_pb2.AbortResponse(found=r is not None)

    def GetStats(self, request, context):
        return worker_pb2.WorkerStats(role="decode", block_size=BLOCK_SIZE, total_kv_blocks=self.total_blocks,
                                      free_kv_blocks=self.free_blocks, used_kv_blocks=self.used_blocks)

    def capacity(self) -> router_pb2.WorkerCapacity:
        return router_pb2.WorkerCapacity(total_kv_blocks=self.total_blocks, free_kv_blocks=self.free_blocks,
                                         running_requests=len(self.reservations), max_running_requests=64)


class ScriptedPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, decoders: dict[str, ScriptedDecode], delay: float = 0.0, answer_delay: float = 0.0) -> None:
        self.decoders = decoders  # kv_address -> decode worker: "pushing KV" marks it arrived
        self.delay = delay
        self.answer_delay = answer_delay  # after the KV "arrived": decode may finish before Prefill answers
        self.served: list[str] = []
        self.aborted: list[str] = []
        self.fail_with: str | None = None  # answer every Prefill with UNAVAILABLE and this message

    def Prefill(self, request, context):
        self.served.append(request.request_id)
        if self.fail_with:
            context.abort(grpc.StatusCode.UNAVAILABLE, self.fail_with)
        time.sleep(self.delay)
        decode = self.decoders[request.kv_address]
        r = decode.reservations.get(request.request_id)
        if r is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no reservation")
        r.kv_arrived.set()
        time.sleep(self.answer_delay)
        return worker_pb2.PrefillResponse(request_id=request.request_id, first_token_id=decode.script[0],
                                          first_logprobs=(decode._logprobs(r, 0) or [None])[0],
                                          num_prompt_tokens=len(request.prompt_token_ids), kv_bytes=4096,
                                          transfer_seconds=0.001)

    def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return worker_pb2.AbortResponse(found=False)

    def GetStats(self, request, context):
        return worker_pb2.WorkerStats(role="prefill")

    def capacity(self) -> router_pb2.WorkerCapacity:
        return router_pb2.WorkerCapacity()


class WorkerProcess:
    """A scripted worker's gRPC server plus its registration and heartbeat thread; ``security``: the
    cluster token its server checks and its router channel sends, and mutual TLS, as a real worker's."""

    def __init__(self, servicer, role: int, router_address: str, heartbeat: bool = True,
                 fingerprint: router_pb2.ModelFingerprint = FINGERPRINT,
                 security: ClusterSecurity = ClusterSecurity()) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  interceptors=security.server_interceptors())
        if isinstance(servicer, ScriptedDecode):
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, self.server)
        else:
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, self.server)
        port = security.add_port(self.server, "127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        servicer.address = self.address
        self.server.start()
        self.channel = security.channel(router_address)
        self.router = router_pb2_grpc.RouterStub(self.channel)
        self.role = role
        self.fingerprint = fingerprint
        self.worker_id = ""
        self.stopping = threading.Event()
        self.heartbeat = heartbeat
        self.thread: threading.Thread | None = None

    def register(self) -> None:
        response = self.router.RegisterWorker(
            router_pb2.RegisterWorkerRequest(role=self.role, address=self.address, fingerprint=self.fingerprint,
                                             capacity=self.servicer.capacity()),
            timeout=5,
        )
        self.worker_id = response.worker_id
        if self.heartbeat:
            self.thread = threading.Thread(target=self._beat, args=(response.heartbeat_interval_ms / 1000,),
                                           daemon=True)
            self.thread.start()

    def _beat(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            try:
                self.router.Heartbeat(router_pb2.HeartbeatRequest(worker_id=self.worker_id,
                                                                  capacity=self.servicer.capacity()), timeout=2)
            except grpc.RpcError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
        self.server.stop(None)
        self.channel.close()


class ScriptedCluster:
    """One scripted decode and one scripted prefill worker, registered with ``router``; every request's
    output is ``text`` (tokenized as the router's model does) and EOS. ``security``: as WorkerProcess's."""

    def __init__(self, router, served_model, text: str, token_delay: float = 0.0,
                 security: ClusterSecurity = ClusterSecurity()) -> None:
        self.router = router
        self.script = served_model.tokenizer.encode(text, add_special_tokens=False) + [2]
        self.decode = ScriptedDecode(self.script, token_delay=token_delay)
        decode = WorkerProcess(self.decode, router_pb2.WORKER_ROLE_DECODE, router.grpc_address, security=security)
        self.prefill = ScriptedPrefill({decode.address: self.decode})
        prefill = WorkerProcess(self.prefill, router_pb2.WORKER_ROLE_PREFILL, router.grpc_address, security=security)
        self.processes = [decode, prefill]
        for p in self.processes:
            p.register()

    def stop(self) -> None:
        for p in self.processes:
            p.stop()
