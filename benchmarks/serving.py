"""Serving benchmark: replays a seeded synthetic workload against a running OpenAI-compatible server.

It starts nothing itself. Requests arrive as a Poisson process at ``--request-rate`` requests/s
(``inf``: all at once), stream their output, and ask for ``ignore_eos`` so every request generates
exactly its output length. Prints request and token throughput, time to first token (TTFT),
inter-token latency (ITL: gaps between streamed chunks that carry text) and time per output token.

    python -m engine serve --port 8000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp

# common one-token English words: prompts of N words are close to N tokens for BPE tokenizers
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does"
).split()


@dataclass
class RequestSpec:
    prompt: str
    input_words: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_workload(num: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)

    specs = []
    for i in range(num):
        n_in = length(input_len)
        # a unique head keeps requests from sharing cached prefixes by accident
        words = [f"Request {i}:"] + [rng.choice(_WORDS) for _ in range(max(n_in - 2, 1))]
        specs.append(RequestSpec(" ".join(words), n_in, length(output_len)))
    return specs


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Start times (seconds from t0) of a Poisson process with ``rate`` arrivals per second."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_one(
    session: aiohttp.ClientSession, args: argparse.Namespace, model: str, spec: RequestSpec
) -> RequestResult:
    chat = args.endpoint.endswith("chat/completions")
    body: dict = {
        "model": model,
        "max_tokens": spec.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with session.post(args.base_url + args.endpoint, json=body) as resp:
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


async def prefix_cache_hits(session: aiohttp.ClientSession, base_url: str) -> float | None:
    """The server's vllm:prefix_cache_hits_total, if it exports one: a repeated run of the same seed
    finds its prompts cached, which shortens TTFT."""
    try:
        async with session.get(base_url + "/metrics") as r:
            if r.status != 200:
                return None
            text = await r.text()
    except aiohttp.ClientError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:prefix_cache_hits_total")]
    return sum(values) if values else None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def benchmark(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        model = args.model
        if model is None:
            async with session.get(args.base_url + "/v1/models") as r:
                r.raise_for_status()
                model = (await r.json())["data"][0]["id"]
        specs = make_workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
        delays = arrival_delays(args.num_prompts, args.request_rate, args.seed)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def launch(spec: RequestSpec, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            if limit is None:
                return await run_one(session, args, model, spec)
            async with limit:
                return await run_one(session, args, model, spec)

        hits0 = await prefix_cache_hits(session, args.base_url)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(launch(s, d) for s, d in zip(specs, delays)))
        duration = time.perf_counter() - t0
        hits1 = await prefix_cache_hits(session, args.base_url)
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "model": model,
        "endpoint": args.endpoint,
        "request_rate": args.request_rate,
        "num_prompts": args.num_prompts,
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "prefix_cache_hit_tokens": None if hits0 is None or hits1 is None else hits1 - hits0,
    }
    for name, vals in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", [r.latency for r in ok])):
        summary[f"mean_{name}_ms"] = 1000 * statistics.fmean(vals) if vals else float("nan")
        summary[f"median_{name}_ms"] = 1000 * pct(vals, 50)
        summary[f"p99_{name}_ms"] = 1000 * pct(vals, 99)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def print_summary(s: dict) -> None:
    line = "=" * 56
    print(line)
    print(f"{'Serving Benchmark Result':^56}")
    print(line)
    rows = [
        ("Model", s["model"]),
        ("Endpoint", s["endpoint"]),
        ("Request rate (req/s)", s["request_rate"]),
        ("Successful requests", s["successful_requests"]),
        ("Failed requests", s["failed_requests"]),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Prompt tokens found in prefix cache", "n/a" if s["prefix_cache_hit_tokens"] is None
         else int(s["prefix_cache_hit_tokens"])),
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
        print(f"{k:^56}" if v is None else f"{k:<40}{v:>16}")
    print(line)
    for e in s.get("errors", []):
        print(f"error: {e}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in mean*(1 +- ratio)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds without data before a request fails")
    p.add_argument("--result-json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if args.num_prompts < 1 or args.request_rate <= 0 or not 0 <= args.range_ratio < 1:
        p.error("need --num-prompts >= 1, --request-rate > 0 and 0 <= --range-ratio < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(benchmark(args))
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({**summary, "args": {k: v for k, v in vars(args).items() if k != "api_key"}}, f, indent=2)
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
