"""GET /metrics: engine and server state in the Prometheus text format (version 0.0.4).

Names follow vLLM's (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``, ...) so
dashboards and load generators written for vLLM read them unchanged. Engine stats without a vLLM
name (for instance the speculative-decoding counters) are exported as ``vllm:engine_<key>``.
"""
from __future__ import annotations

import math
from typing import Any

from engine.core.async_engine import AsyncLLMEngine, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# engine stat -> (metric name, type, help)
_KNOWN = {
    "num_running": ("vllm:num_requests_running", "gauge", "Requests running on the engine."),
    "num_waiting": ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full)."),
    "kv_blocks_used": ("vllm:kv_cache_blocks_used", "gauge", "KV-cache blocks held by requests."),
    "kv_blocks_total": ("vllm:kv_cache_blocks_total", "gauge", "KV-cache blocks in all."),
    "prefix_cache_queries": (
        "vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache."
    ),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache."),
    "scheduler_num_preemptions": ("vllm:num_preemptions_total", "counter", "Requests preempted."),
    "prompt_tokens_total": ("vllm:prompt_tokens_total", "counter", "Prefill tokens processed."),
    "generation_tokens_total": ("vllm:generation_tokens_total", "counter", "Tokens generated."),
    "num_swapped": ("vllm:num_requests_swapped", "gauge", "Requests whose KV blocks are swapped out to host memory."),
    "spec_num_drafts": ("vllm:spec_decode_num_drafts_total", "counter", "Request-steps that verified proposals."),
    "spec_num_draft_tokens": ("vllm:spec_decode_num_draft_tokens_total", "counter", "Proposed tokens verified."),
    "spec_num_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens accepted."),
}
_SKIP = {"kv_blocks_free"}


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if isinstance(v, bool):
        return str(int(v))
    return repr(float(v)) if isinstance(v, float) else str(v)


def _labels(base: dict[str, str], **extra: str) -> str:
    items = {**base, **extra}
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in items.items())
    return "{" + inner + "}" if inner else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(key: str) -> str:
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    return f"vllm:engine_{safe}"


class _Writer:
    def __init__(self, labels: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.labels = labels

    def scalar(self, name: str, kind: str, help: str, value: float, **labels: str) -> None:
        self.header(name, kind, help)
        self.sample(name, value, **labels)

    def header(self, name: str, kind: str, help: str) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(self.labels, **labels)} {_fmt(value)}")

    def histogram(self, name: str, help: str, h: Histogram) -> None:
        buckets, total, count = h.snapshot()
        self.header(name, "histogram", help)
        for bound, c in buckets:
            self.sample(f"{name}_bucket", c, le=_fmt(bound))
        self.sample(f"{name}_sum", total)
        self.sample(f"{name}_count", count)


def render_metrics(engine: AsyncLLMEngine, model_name: str) -> str:
    w = _Writer({"model_name": model_name})
    stats: dict[str, Any] = engine.get_stats()
    for key, value in stats.items():
        if key in _SKIP or not isinstance(value, (int, float)):
            continue
        name, kind, help = _KNOWN.get(key, (_metric_name(key), "gauge", f"Engine stat {key}."))
        w.scalar(name, kind, help, value)
    m = engine.metrics
    w.scalar("vllm:engine_healthy", "gauge", "1 while the engine runs, 0 after it failed.", 0 if engine.errored else 1)
    w.header("vllm:request_success_total", "counter", "Finished requests, by finish reason (abort: client gone).")
    for reason, count in sorted(m.finished.items()):
        w.sample("vllm:request_success_total", count, finished_reason=reason)
    w.scalar("vllm:num_aborted_requests_total", "counter", "Requests aborted before they finished.",
             m.finished.get("abort", 0))
    w.scalar("vllm:num_failed_requests_total", "counter", "Requests in flight when the engine failed.",
             m.requests_failed)
    w.scalar("vllm:num_requests_total", "counter", "Requests accepted by the engine.", m.requests_added)
    w.histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first generated token.", m.ttft)
    w.histogram("vllm:inter_token_latency_seconds", "Time between successive steps that gave a request tokens.", m.itl)
    w.histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token (finished requests).", m.e2e)
    return "\n".join(w.lines) + "\n"
