"""The data-parallel part of /metrics: each replica's engine stats (label ``engine="<index>"``,
beside the unlabelled total the one-engine names already carry), replica states and the router's
prefix-aware routing counters."""
from __future__ import annotations

from typing import Any

from engine.core.stats import EngineStats


def replica_stats(engine: Any) -> list[tuple[str, EngineStats]]:
    """(label, stats) of each replica with stats yet; empty for an engine that is not data-parallel."""
    from engine.dp.client import DPAsyncEngine

    if not isinstance(engine, DPAsyncEngine):
        return []
    return [(str(r.index), r.stats) for r in engine.replicas if r.stats is not None]


def write_dp_metrics(w: Any, engine: Any) -> None:
    from engine.dp.client import DPAsyncEngine

    if not isinstance(engine, DPAsyncEngine):
        return
    router = engine.router
    w.header("vllm:dp_replica_up", "gauge", "1 while a data-parallel replica is in rotation, 0 while it is down or dead.")
    for r in engine.replicas:
        w.sample("vllm:dp_replica_up", int(r.state == "up"), engine=str(r.index))
    w.header("vllm:dp_replica_restarts_total", "counter", "Times a data-parallel replica came back after it died.")
    for r in engine.replicas:
        w.sample("vllm:dp_replica_restarts_total", r.restarts, engine=str(r.index))
    w.header("vllm:dp_routed_requests_total", "counter", "Requests the router placed on each replica.")
    for i, n in enumerate(router.routed):
        w.sample("vllm:dp_routed_requests_total", n, engine=str(i))
    w.header("vllm:dp_prefix_routed_requests_total", "counter",
             "Requests placed on a replica that had been sent at least one of their leading full KV blocks.")
    for i, n in enumerate(router.prefix_hits):
        w.sample("vllm:dp_prefix_routed_requests_total", n, engine=str(i))
    w.scalar("vllm:dp_prefix_routing_hit_rate", "gauge",
             "Fraction of routed requests placed with a prefix hit (all replicas).", router.hit_rate)
