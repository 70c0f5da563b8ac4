"""Prefix-aware routing (engine/dp/router.py) and adding up replicas' stats, without Ray."""
from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.stats import EngineStats, KVCacheStats, SchedulerStats
from engine.dp.client import DPAsyncEngine
from engine.dp.launch import ReplicaHandle
from engine.dp.router import PrefixAwareRouter, PrefixRecord
from engine.dp.stats import sum_stats
from engine.errors import EngineDeadError
from engine.spec_decode.stats import SpecDecodingStats

BS = 4


def test_repeated_long_prefix_goes_to_the_replica_that_has_it():
    router = PrefixAwareRouter(num_replicas=3, block_size=BS)
    prefix = list(range(100, 132))  # 8 full blocks
    loads = {0: 0, 1: 0, 2: 0}
    first = router.choose(prefix + [1, 2], loads)
    assert first.matched_blocks == 0
    router.record(first)
    loads[first.replica] += 1  # it is still running there
    for k in range(5):
        d = router.choose(prefix + [7 + k] * 5, loads)
        assert d.replica == first.replica and d.matched_blocks == 8
        router.record(d)
        loads[d.replica] += 1  # busier, but within the imbalance allowance (4)
        if loads[d.replica] > 4:
            break
    # once it is more than `imbalance` sequences busier than the others, load wins
    loads[first.replica] = 10
    d = router.choose(prefix, loads)
    assert d.replica != first.replica and d.matched_blocks == 0
    assert router.prefix_hits[first.replica] >= 4 and 0 < router.hit_rate < 1


def test_unrelated_prompts_spread_by_load():
    router = PrefixAwareRouter(num_replicas=2, block_size=BS)
    loads = {0: 0, 1: 0}
    for i in range(6):
        d = router.choose([i * 1000 + j for j in range(9)], loads)
        router.record(d)
        loads[d.replica] += 1
    assert loads == {0: 3, 1: 3} and router.hit_rate == 0


def test_forgotten_replica_and_excluded_ones_are_not_chosen_for_their_prefix():
    router = PrefixAwareRouter(num_replicas=2, block_size=BS)
    p = list(range(16))
    d = router.choose(p, {0: 0, 1: 0})
    router.record(d)
    router.forget(d.replica)  # it restarted: its cache is empty
    assert router.choose(p, {0: 0, 1: 0}).matched_blocks == 0
    router.record(router.choose(p, {0: 0, 1: 0}))
    other = 1 - d.replica
    assert router.choose(p, {0: 0, 1: 0}, exclude=frozenset({d.replica})).replica == other
    assert router.choose(p, {other: 0}).replica == other  # only routable replicas are in `loads`


def test_adapters_salt_the_prefix():
    router = PrefixAwareRouter(num_replicas=2, block_size=BS)
    p = list(range(16))
    router.record(router.choose(p, {0: 0, 1: 0}, salt=None))
    assert router.choose(p, {0: 0, 1: 0}, salt=7).matched_blocks == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=40),
       st.integers(1, 4), st.integers(4, 64))
def test_router_invariants(reqs, n, capacity):
    """Any request stream: the choice is routable, never more than `imbalance` busier than the least
    loaded, the match length is what the chosen record really holds, records stay bounded."""
    rng = random.Random(len(reqs))
    router = PrefixAwareRouter(num_replicas=n, block_size=BS, capacity=capacity)
    loads = {i: 0 for i in range(n)}
    for family, length, finish in reqs:
        up = {i: v for i, v in loads.items() if rng.random() < 0.8} or {0: loads[0]}
        tokens = [family * 997 + j for j in range(length)]
        d = router.choose(tokens, up)
        assert d.replica in up
        assert up[d.replica] <= min(up.values()) + router.imbalance
        assert d.matched_blocks == router.records[d.replica].matched(d.chain) <= length // BS
        router.record(d)
        loads[d.replica] += 1
        for _ in range(finish):
            busy = [i for i, v in loads.items() if v]
            if busy:
                loads[rng.choice(busy)] -= 1
    assert all(len(r.hashes) <= capacity for r in router.records)
    assert sum(router.routed) == len(reqs) and sum(router.prefix_hits) <= len(reqs)


def test_record_is_an_lru():
    rec = PrefixRecord(capacity=3)
    rec.add([b"a", b"b", b"c"])
    rec.add([b"a"])  # refreshed
    rec.add([b"d"])  # evicts b, the least recently routed
    assert list(rec.hashes) == [b"c", b"a", b"d"]
    assert rec.matched([b"a", b"b"]) == 1


def test_stats_add_up():
    a = EngineStats(num_running=2, prompt_tokens_total=10, scheduler=SchedulerStats(num_steps=3),
                    kv_cache=KVCacheStats(kv_blocks_total=10, kv_blocks_used=5, kv_cache_usage=0.5,
                                          prefix_cache_queries=8, prefix_cache_hits=4),
                    spec_decoding=SpecDecodingStats(1, 2, 1, [1]))
    b = EngineStats(num_running=1, prompt_tokens_total=5, scheduler=SchedulerStats(num_steps=4),
                    kv_cache=KVCacheStats(kv_blocks_total=30, kv_blocks_used=3, kv_cache_usage=0.1,
                                          prefix_cache_queries=2, prefix_cache_hits=0),
                    spec_decoding=SpecDecodingStats(2, 4, 3, [2, 1]))
    s = sum_stats([a, b])
    assert (s.num_running, s.prompt_tokens_total, s.scheduler.num_steps) == (3, 15, 7)
    assert s.kv_cache.kv_blocks_total == 40 and s.kv_cache.kv_cache_usage == 8 / 40
    assert s.kv_cache.prefix_cache_hit_rate == 0.4
    assert s.spec_decoding.accepted_per_position == [3, 1] and s.spec_decoding.acceptance_rate == 4 / 6
    assert s.structured_output.compile_seconds_buckets == a.structured_output.compile_seconds_buckets
    assert sum_stats([]) == EngineStats()


def test_health_is_degraded_while_some_replica_is_down_and_dead_when_none_is_up():
    eng = DPAsyncEngine.__new__(DPAsyncEngine)  # the report only reads the replicas' states
    eng._stopping = False
    eng.replicas = [ReplicaHandle(0, None, None, state="up"), ReplicaHandle(1, None, None, state="up")]
    assert asyncio.run(eng.check_health())["status"] == "ok"
    eng.replicas[1].state, eng.replicas[1].last_error = "down", "ActorDiedError: killed"
    report = asyncio.run(eng.check_health())
    assert report["status"] == "degraded" and report["replicas"][1] == {
        "index": 1, "state": "down", "restarts": 0, "load": 0, "error": "ActorDiedError: killed"}
    assert not eng.errored
    eng.replicas[0].state = "down"
    with pytest.raises(EngineDeadError, match="no data-parallel replica is alive: replica 0 down; replica 1 down"):
        asyncio.run(eng.check_health())
    assert not eng.errored, "restarting replicas may come back"
    for r in eng.replicas:
        r.state = "dead"
    assert eng.errored
