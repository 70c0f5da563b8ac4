"""The engine as a benchmark subject: requests through ``LLMEngine.step`` with a timeline of
generated tokens/s and KV-cache use, and per-request time to first token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.bench.datasets import BenchRequest
from engine.bench.machine import OtherLoad
from engine.bench.peers import PeerResult
from engine.sampling_params import SamplingParams


@dataclass
class Timeline:
    times: list[float] = field(default_factory=list)  # seconds from the start
    tokens_per_s: list[float] = field(default_factory=list)  # generation rate since the last sample
    kv_usage: list[float] = field(default_factory=list)  # fraction of KV blocks in use


@dataclass
class EngineRun:
    result: PeerResult
    timeline: Timeline
    ttft_s: list[float]
    itl_s: list[float]  # mean gap between a request's tokens after its first, one per request
    prefix_cache_hit_rate: float | None


def greedy(r: BenchRequest, **extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True, **extra)


def run_engine(llm: Any, requests: list[BenchRequest], settings: str, params: list[SamplingParams] | None = None,
               sample_every_s: float = 0.25, desc: str = "engine") -> EngineRun:
    engine = llm.llm_engine
    params = params or [greedy(r) for r in requests]
    stats0 = engine.get_stats().kv_cache
    gen0 = engine.num_generation_tokens
    line = Timeline()
    done: dict[str, Any] = {}
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
    with OtherLoad() as load:
        t0 = time.perf_counter()
        for i, (r, p) in enumerate(zip(requests, params)):
            engine.add_request(f"bench-{i}", r.prompt, p)
        last_t, last_gen = t0, gen0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
            now = time.perf_counter()
            if now - last_t >= sample_every_s or not engine.has_unfinished_requests():
                gen = engine.num_generation_tokens
                line.times.append(now - t0)
                line.tokens_per_s.append((gen - last_gen) / max(now - last_t, 1e-9))
                line.kv_usage.append(engine.get_stats().kv_cache.kv_cache_usage)
                last_t, last_gen = now, gen
        seconds = time.perf_counter() - t0
    bar.close()
    outs = list(done.values())
    ttft, itl = [], []
    for o in outs:
        m = o.metrics
        if m is not None and m.first_token_time is not None:
            ttft.append(m.first_token_time - m.arrival_time)
            n = len(o.outputs[0].token_ids)
            if n > 1 and m.last_token_time is not None:
                itl.append((m.last_token_time - m.first_token_time) / (n - 1))
    stats1 = engine.get_stats().kv_cache
    queries = stats1.prefix_cache_queries - stats0.prefix_cache_queries
    hits = stats1.prefix_cache_hits - stats0.prefix_cache_hits
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = PeerResult("engine", settings, True, "", len(requests), tokens, seconds, load.cores)
    return EngineRun(result, line, ttft, itl, hits / queries if queries else None)
