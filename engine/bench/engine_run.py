"""The engine as a benchmark subject: requests through ``LLMEngine.step`` with a timeline of
generated tokens/s, KV-cache use and running requests, per-request time to first token, and the
single-request decode step every throughput figure is read next to."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.bench.datasets import BenchRequest, Workload
from engine.bench.machine import OtherLoad
from engine.bench.peers import PeerResult
from engine.sampling_params import SamplingParams


@dataclass
class Timeline:
    times: list[float] = field(default_factory=list)  # seconds from the start
    tokens_per_s: list[float] = field(default_factory=list)  # generation rate since the last sample
    kv_usage: list[float] = field(default_factory=list)  # fraction of KV blocks in use
    running: list[int] = field(default_factory=list)  # requests running at the sample

    def rate_by_running(self) -> list[tuple[int, float]]:
        """(running requests, mean generation tokens/s of the samples with that many): an offline
        run's throughput-vs-concurrency curve, as requests finish and the batch shrinks."""
        groups: dict[int, list[float]] = {}
        for n, r in zip(self.running, self.tokens_per_s):
            if n > 0:
                groups.setdefault(n, []).append(r)
        return sorted((n, statistics.fmean(v)) for n, v in groups.items())


@dataclass
class EngineRun:
    result: PeerResult
    timeline: Timeline
    ttft_s: list[float]
    itl_s: list[float]  # mean gap between a request's tokens after its first, one per request
    prefix_cache_hit_rate: float | None
    outputs: list[list[int]]  # each request's generated token ids, in request order
    prompt_tokens: int  # prompt tokens of all requests
    prefill_tokens: int  # prompt tokens computed (prefix-cache hits are not computed)
    steps: int


def greedy(r: BenchRequest, **extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True, **extra)


def run_engine(llm: Any, requests: list[BenchRequest], settings: str, params: list[SamplingParams] | None = None,
               sample_every_s: float = 0.25, desc: str = "engine") -> EngineRun:
    engine = llm.llm_engine
    params = params or [greedy(r) for r in requests]
    stats0 = engine.get_stats()
    gen0 = engine.num_generation_tokens
    line = Timeline()
    done: dict[str, Any] = {}
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
    with OtherLoad() as load:
        t0 = time.perf_counter()
        for i, (r, p) in enumerate(zip(requests, params)):
            engine.add_request(f"bench-{i}", r.engine_prompt(), p)
        last_t, last_gen = t0, gen0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
            now = time.perf_counter()
            if now - last_t >= sample_every_s or not engine.has_unfinished_requests():
                gen = engine.num_generation_tokens
                stats = engine.get_stats()
                line.times.append(now - t0)
                line.tokens_per_s.append((gen - last_gen) / max(now - last_t, 1e-9))
                line.kv_usage.append(stats.kv_cache.kv_cache_usage)
                line.running.append(stats.num_running)
                last_t, last_gen = now, gen
        seconds = time.perf_counter() - t0
    bar.close()
    outs = [done[f"bench-{i}"] for i in range(len(requests))]
    ttft, itl = [], []
    for o in outs:
        m = o.metrics
        if m is not None and m.first_token_time is not None:
            ttft.append(m.first_token_time - m.arrival_time)
            n = len(o.outputs[0].token_ids)
            if n > 1 and m.last_token_time is not None:
                itl.append((m.last_token_time - m.first_token_time) / (n - 1))
    stats1 = engine.get_stats()
    queries = stats1.kv_cache.prefix_cache_queries - stats0.kv_cache.prefix_cache_queries
    hits = stats1.kv_cache.prefix_cache_hits - stats0.kv_cache.prefix_cache_hits
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = PeerResult("engine", settings, True, "", len(requests), tokens, seconds, load.cores)
    return EngineRun(result, line, ttft, itl, hits / queries if queries else None,
                     [list(o.outputs[0].token_ids) for o in outs], sum(len(o.prompt_token_ids) for o in outs),
                     stats1.scheduler.num_prefill_tokens - stats0.scheduler.num_prefill_tokens,
                     stats1.scheduler.num_steps - stats0.scheduler.num_steps)


def decode_step_s(llm: Any, prompt: str | dict | list[int], n: int = 128) -> float:
    """Seconds per decode step of one request alone (first token to last, per token)."""
    if isinstance(prompt, list):
        prompt = {"prompt_token_ids": prompt}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    return (m.finished_time - m.first_token_time) / (n - 1)


def generate_workload(llm: Any, wl: Workload) -> float:
    """Seconds for ``llm.generate`` on a token-id workload, all at once; checks every length
    (the old ``benchmarks/throughput.run_engine`` that gguf.py and lora.py time with)."""
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in wl.output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    if [len(o.outputs[0].token_ids) for o in outs] != wl.output_lens:
        raise RuntimeError("the engine generated other lengths than requested")
    return elapsed
