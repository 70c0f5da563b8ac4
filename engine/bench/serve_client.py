"""Replays a workload against an OpenAI-compatible server: Poisson arrivals at a request rate, at
most ``max_concurrency`` in flight, every request streamed with ``ignore_eos`` so it generates
exactly its output length; TTFT, inter-token latency (gaps between chunks that carry text), time
per output token, and a timeline of the server's generation rate and KV-cache use from /metrics."""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from engine.bench.datasets import BenchRequest, arrival_delays


@dataclass
class ClientArgs:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "/v1/completions"
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    temperature: float = 0.0
    seed: int = 0
    timeout: float = 600.0  # seconds without data before a request fails
    metrics_every_s: float = 0.5  # 0: no timeline (a server without /metrics)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def run_one(session: aiohttp.ClientSession, a: ClientArgs, model: str, req: BenchRequest) -> RequestResult:
    chat = a.endpoint.endswith("chat/completions")
    body: dict = {"model": model, "max_tokens": req.output_len, "temperature": a.temperature, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt if req.prompt_token_ids is None else req.prompt_token_ids
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with session.post(a.base_url + a.endpoint, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    text = c["delta"].get("content") if chat else c.get("text")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
        res.latency = time.perf_counter() - start
        res.ok = last is not None and res.output_tokens > 0
        if not res.ok:
            res.error = "no output"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = repr(e)
    return res


def metric_sum(text: str, name: str) -> float | None:
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
    return sum(vals) if vals else None


async def scrape(session: aiohttp.ClientSession, base_url: str) -> str | None:
    try:
        async with session.get(base_url + "/metrics") as r:
            return await r.text() if r.status == 200 else None
    except aiohttp.ClientError:
        return None


async def _timeline(session, a: ClientArgs, t0: float, out: dict, stop: asyncio.Event) -> None:
    last_t, last_gen = None, None
    while not stop.is_set():
        text = await scrape(session, a.base_url)
        now = time.perf_counter()
        if text is not None:
            gen = metric_sum(text, "vllm:generation_tokens_total")
            kv = metric_sum(text, "vllm:kv_cache_usage_perc")
            if gen is not None and last_gen is not None:
                out["times"].append(now - t0)
                out["tokens_per_s"].append((gen - last_gen) / max(now - last_t, 1e-9))
                out["kv_usage"].append(kv or 0.0)
            last_t, last_gen = now, gen
        try:
            await asyncio.wait_for(stop.wait(), a.metrics_every_s)
        except asyncio.TimeoutError:
            pass


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def benchmark(a: ClientArgs, requests: list[BenchRequest]) -> dict:
    """The summary (vLLM's ``bench serve`` keys), with the raw TTFT / ITL samples and timeline."""
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=a.timeout)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = a.model
        if model is None:
            async with session.get(a.base_url + "/v1/models") as r:
                r.raise_for_status()
                model = (await r.json())["data"][0]["id"]
        delays = arrival_delays(len(requests), a.request_rate, a.seed)
        limit = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else None

        async def launch(req: BenchRequest, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            if limit is None:
                return await run_one(session, a, model, req)
            async with limit:
                return await run_one(session, a, model, req)

        metrics0 = await scrape(session, a.base_url)
        line = {"times": [], "tokens_per_s": [], "kv_usage": []}
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.ensure_future(_timeline(session, a, t0, line, stop)) if a.metrics_every_s > 0 else None
        results = await asyncio.gather(*(launch(r, d) for r, d in zip(requests, delays)))
        duration = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            await sampler
        metrics1 = await scrape(session, a.base_url)
    return summarize(model, a, results, duration, line, metrics0, metrics1)


def summarize(model: str, a: ClientArgs, results: list[RequestResult], duration: float, line: dict,
              metrics0: str | None, metrics1: str | None) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    hits = None
    if metrics0 is not None and metrics1 is not None:
        h0, h1 = metric_sum(metrics0, "vllm:prefix_cache_hits_total"), metric_sum(metrics1, "vllm:prefix_cache_hits_total")
        hits = None if h0 is None or h1 is None else h1 - h0
    s = {
        "model": model, "endpoint": a.endpoint, "request_rate": a.request_rate, "max_concurrency": a.max_concurrency,
        "num_prompts": len(results), "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration, "prefix_cache_hit_tokens": hits,
    }
    for name, vals in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", [r.latency for r in ok])):
        s[f"mean_{name}_ms"] = 1000 * statistics.fmean(vals) if vals else float("nan")
        s[f"median_{name}_ms"] = 1000 * pct(vals, 50)
        s[f"p99_{name}_ms"] = 1000 * pct(vals, 99)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        s["errors"] = errors[:5]
    s["samples"] = {"ttft_s": ttft, "itl_s": itl}
    s["timeline"] = line
    return s


def print_summary(s: dict) -> None:
    line = "=" * 56
    print(line)
    print(f"{'Serving Benchmark Result':^56}")
    print(line)
    rows = [
        ("Model", s["model"]), ("Endpoint", s["endpoint"]), ("Request rate (req/s)", s["request_rate"]),
        ("Max concurrency", s["max_concurrency"]), ("Successful requests", s["successful_requests"]),
        ("Failed requests", s["failed_requests"]), ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]), ("Total generated tokens", s["total_output_tokens"]),
        ("Prompt tokens found in prefix cache",
         "n/a" if s["prefix_cache_hit_tokens"] is None else int(s["prefix_cache_hit_tokens"])),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
    ]
    for title, key in (("Time to First Token", "ttft"), ("Inter-token Latency", "itl"),
                       ("Time per Output Token (excl. 1st token)", "tpot"), ("End-to-end Latency", "e2e")):
        rows.append((f"-- {title} --", None))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {key.upper()} (ms)", f"{s[f'{stat}_{key}_ms']:.2f}"))
    for k, v in rows:
        print(f"{k:^56}" if v is None else f"{k:<40}{v!s:>16}")
    print(line)
    for e in s.get("errors", []):
        print(f"error: {e}")
