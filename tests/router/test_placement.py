"""Conditional disaggregation's rules (router/placement.py) and the router's prefix-cache estimate
(registry.RecentBlocks), on a real registry with explicit capacities: each rule fires, with its reason,
exactly where its threshold says."""

import argparse

import pytest

from kvferry.router.placement import DisaggregationPolicy, add_placement_arguments, decide, placement_from_args
from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.router.registry import (
    RecentBlocks,
    WorkerRegistry,
    prompt_block_hashes,
)

FP = KVFingerprint(model_name="m", dtype="bfloat16", block_size=16, num_layers=30, vocab_size=49152)
POLICY = DisaggregationPolicy(local_prefill_max_tokens=64, local_prefill_cached_fraction=0.75,
                              prefill_busy_tokens=1000, idle_decode_load=0.25)


def cluster(decode_running=0, prefill_queued=0, with_prefill=True):
    reg = WorkerRegistry()
    decode = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP,
                          WorkerStats(total_kv_blocks=100, free_kv_blocks=100, running_requests=decode_running,
                                   max_running_requests=8))
    if with_prefill:
        reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", FP, WorkerStats(queued_prefill_tokens=prefill_queued))
    return reg, decode


def where(reg, decode, num_tokens, cached=0, policy=POLICY):
    d = decide(policy, decode, reg.live(WorkerRole.PREFILL), num_tokens, cached)
    return d.label, d.reason


def test_short_prompts_stay_local_and_long_ones_go_to_the_prefill_worker():
    reg, decode = cluster()
    assert where(reg, decode, 64) == ("local", "short_prompt")
    assert where(reg, decode, 65) == ("remote", "default")
    assert where(reg, decode, 2000) == ("remote", "default")


def test_a_mostly_cached_prompt_stays_local():
    reg, decode = cluster()
    assert where(reg, decode, 1000, cached=950) == ("local", "cached")  # 50 uncached: short once cached
    assert where(reg, decode, 4000, cached=3000) == ("local", "cached")  # 75%
    assert where(reg, decode, 4000, cached=2992) == ("remote", "default")


def test_an_idle_decode_worker_prefills_when_the_prefill_queue_is_long():
    reg, decode = cluster(decode_running=2, prefill_queued=1000)  # load 2/8 <= 0.25, queue at the bar
    assert where(reg, decode, 500) == ("local", "prefill_busy")
    assert where(reg, decode, 1000) == ("remote", "default")  # as long as the queue: no gain
    reg, decode = cluster(decode_running=3, prefill_queued=5000)  # 3/8: decode is busy too
    assert where(reg, decode, 500) == ("remote", "default")
    reg, decode = cluster(decode_running=0, prefill_queued=999)
    assert where(reg, decode, 500) == ("remote", "default")
    # What the router just sent the decode worker to prefill counts against it until its heartbeat.
    reg, decode = cluster(prefill_queued=1000)
    reg.on_local_prefill(decode, 600)
    assert where(reg, decode, 500) == ("remote", "default")


def test_no_prefill_worker_means_local_and_modes_override_the_rules():
    reg, decode = cluster(with_prefill=False)
    assert where(reg, decode, 5000) == ("local", "no_prefill_worker")
    reg, decode = cluster()
    assert where(reg, decode, 10, policy=DisaggregationPolicy(mode="never")) == ("remote", "never")
    assert where(reg, decode, 5000, policy=DisaggregationPolicy(mode="always")) == ("local", "always")


def test_recent_blocks_estimate_a_workers_prefix_cache():
    prompt = tuple(range(100))  # 6 full blocks of 16, then 4 tokens
    hashes = prompt_block_hashes(prompt, 16)
    assert len(hashes) == 6
    assert len(prompt_block_hashes(tuple(range(97)), 16)) == 6  # the last token's block is never cached
    assert len(prompt_block_hashes(tuple(range(96)), 16)) == 5
    other = prompt_block_hashes(tuple(range(32)) + (7,) * 68, 16)
    assert other[:2] == hashes[:2] and other[2] != hashes[2]  # chained: a shared prefix, then apart
    recent = RecentBlocks()
    recent.record(hashes, capacity=100)
    assert recent.num_cached_blocks(hashes) == 6
    assert recent.num_cached_blocks(other) == 2
    recent.record(prompt_block_hashes(tuple(range(1000, 1080)), 16), capacity=8)  # 4 more: oldest go
    assert len(recent) == 8 and recent.num_cached_blocks(hashes) == 0  # its first blocks were evicted


def test_flags_override_the_defaults_and_bad_values_are_refused():
    parser = argparse.ArgumentParser()
    add_placement_arguments(parser)
    assert placement_from_args(parser.parse_args([])) == DisaggregationPolicy()
    policy = placement_from_args(parser.parse_args(["--local-prefill-max-tokens", "300",
                                                    "--local-prefill-cached-fraction", "0.5"]))
    assert (policy.mode, policy.local_prefill_max_tokens, policy.local_prefill_cached_fraction) == ("auto", 300, 0.5)
    with pytest.raises(ValueError, match="cached_fraction"):
        placement_from_args(parser.parse_args(["--local-prefill-cached-fraction", "1.5"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--local-prefill", "sometimes"])
