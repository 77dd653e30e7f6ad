"""The prefill side of test_two_hosts.py, run inside the prefill network namespace (as a script):

    python netns_prefill_driver.py DECODE_ADDRESS TRANSPORT...

Loads the prefill engine once, then for each TRANSPORT (a ``--kv-transport`` value) starts a prefill
worker whose sender is forced to it and sends one prompt's KV to the decode worker at DECODE_ADDRESS
(another namespace, across the veth pair). The same prompt prefilled by the decode worker itself is the
reference. Prints one JSON line per transport, then one with the prefill engine's blocks in use.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: fixtures_workers

TIMEOUT = 60.0


def main(argv: list[str]) -> None:
    import grpc

    from fixtures_workers import engine_config
    from kvferry.engine.engine import LLMEngine
    from kvferry.engine.sampling import SamplingParams
    from kvferry.prefill_worker.worker import PrefillWorker
    from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc
    from kvferry.transport.base import KVFingerprint, KVTarget
    from kvferry.transport.negotiation import NegotiatedKVSender

    decode_address, transports = argv[0], argv[1:]
    engine = LLMEngine(engine_config(), role="prefill")
    fp = KVFingerprint.from_model(engine.model_config, engine.dtype, engine.config.cache.block_size)
    greedy = generate_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    channel = grpc.insecure_channel(decode_address)
    grpc.channel_ready_future(channel).result(timeout=120)  # the decode worker loads its model meanwhile
    decode = worker_pb2_grpc.DecodeWorkerStub(channel)

    def tokens(request_id: str) -> list[int]:
        events = list(decode.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=TIMEOUT))
        assert events[-1].finish_reason == "length", events[-1]
        return [t for e in events for t in e.token_ids]

    for i, transport in enumerate(transports):
        prompt = [(1500 + 53 * j + 7 * i) % 9000 + 100 for j in range(37)]  # 3 blocks of 16
        decode.Reserve(worker_pb2.ReserveRequest(request_id=f"{transport}-ref", prompt_token_ids=prompt,
                                                 sampling=greedy, prefill_locally=True), timeout=TIMEOUT)
        reference = tokens(f"{transport}-ref")
        sender = NegotiatedKVSender(fp, sender_id="prefill-ns", kv_transport=transport)
        worker = PrefillWorker(engine, sender, worker_id="prefill-ns")
        worker.start()
        try:
            reservation = decode.Reserve(worker_pb2.ReserveRequest(
                request_id=f"{transport}-kv", prompt_token_ids=prompt, sampling=greedy), timeout=TIMEOUT)
            target = KVTarget(reservation.kv_address, reservation.receiver_instance_id, timeout_s=30.0)
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            result = worker.prefill(f"{transport}-kv", prompt, params, target).result(timeout=TIMEOUT)
            got = tokens(f"{transport}-kv")
            _, routes = sender.stats.snapshot()
            offers = {o.name: o.address for o in sender.grpc.handshake(reservation.kv_address).transports}
        finally:
            worker.stop()  # closes the sender
        print(json.dumps({"transport": transport, "routes": routes, "first": result.first_token_id, "tokens": got,
                          "reference": reference, "offers": offers}), flush=True)
    stats = decode.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT)
    print(json.dumps({"prefill_used_blocks": engine.block_manager.num_used_blocks,
                      "decode_used_blocks": stats.used_kv_blocks}), flush=True)
    channel.close()


if __name__ == "__main__":
    main(sys.argv[1:])
