"""GET /metrics: engine and server state in the Prometheus text format (version 0.0.4).

Names follow vLLM's (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``, ...) so
dashboards and load generators written for vLLM read them unchanged. Engine stats without a vLLM
name (for instance the scheduler's step counters) are exported as ``vllm:engine_<old stats key>``.
ENGINE_METRICS is the one table from EngineStats fields to metric names; its order is the
order of the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter

from engine.core.engine_client import EngineClient
from engine.core.request_metrics import Histogram
from engine.core.stats import EngineStats
from engine.structured_output.metrics import FIELDS as STRUCTURED_FIELDS
from engine.structured_output.metrics import write_metrics as write_structured_output_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class EngineMetric:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    field: str  # dotted path into EngineStats, e.g. "kv_cache.kv_blocks_used"

    def value(self, stats: EngineStats) -> float:
        return attrgetter(self.field)(stats)


def _stat(key: str, field: str) -> EngineMetric:
    """A stat with no vLLM name: a gauge named after its key in the old stats dict."""
    return EngineMetric(f"vllm:engine_{key}", "gauge", f"Engine stat {key}.", field)


def _scheduler(name: str) -> EngineMetric:
    return _stat(f"scheduler_{name}", f"scheduler.{name}")


ENGINE_METRICS: tuple[EngineMetric, ...] = (
    EngineMetric("vllm:num_requests_running", "gauge", "Requests running on the engine.", "num_running"),
    EngineMetric("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", "num_waiting"),
    EngineMetric("vllm:num_requests_swapped", "gauge", "Requests whose KV blocks are swapped out to host memory.",
                 "num_swapped"),
    EngineMetric("vllm:kv_cache_blocks_total", "gauge", "KV-cache blocks in all.", "kv_cache.kv_blocks_total"),
    EngineMetric("vllm:kv_cache_blocks_used", "gauge", "KV-cache blocks held by requests.", "kv_cache.kv_blocks_used"),
    _stat("kv_blocks_cached", "kv_cache.kv_blocks_cached"),
    EngineMetric("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).",
                 "kv_cache.kv_cache_usage"),
    _stat("kv_host_blocks_total", "kv_cache.kv_host_blocks_total"),
    _stat("kv_host_blocks_free", "kv_cache.kv_host_blocks_free"),
    EngineMetric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                 "kv_cache.prefix_cache_queries"),
    EngineMetric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                 "kv_cache.prefix_cache_hits"),
    _stat("prefix_cache_hit_rate", "kv_cache.prefix_cache_hit_rate"),
    _stat("prefix_cache_evictions", "kv_cache.prefix_cache_evictions"),
    _stat("shared_prompt_tokens", "kv_cache.shared_prompt_tokens"),
    _stat("cow_copies", "kv_cache.cow_copies"),
    _stat("swapped_out_blocks", "kv_cache.swapped_out_blocks"),
    _stat("swapped_in_blocks", "kv_cache.swapped_in_blocks"),
    _stat("swap_in_cache_hits", "kv_cache.swap_in_cache_hits"),
    _scheduler("num_steps"),
    EngineMetric("vllm:num_preemptions_total", "counter", "Requests preempted.", "scheduler.num_preemptions"),
    _scheduler("num_recompute_preemptions"),
    _scheduler("num_swap_preemptions"),
    _scheduler("num_priority_preemptions"),
    _scheduler("num_swap_ins"),
    _scheduler("num_forked_samples"),
    _scheduler("num_forked_beams"),
    _scheduler("num_prefill_tokens"),
    _scheduler("num_decode_tokens"),
    _scheduler("last_num_decodes"),
    _scheduler("last_num_prefills"),
    _scheduler("last_num_scheduled_tokens"),
    _scheduler("last_num_preempted"),
    _scheduler("last_num_running"),
    _scheduler("last_num_waiting"),
    _scheduler("last_num_swapped"),
    EngineMetric("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.", "prompt_tokens_total"),
    EngineMetric("vllm:generation_tokens_total", "counter", "Tokens generated.", "generation_tokens_total"),
    EngineMetric("vllm:spec_decode_num_drafts_total", "counter", "Request-steps that verified proposals.",
                 "spec_decoding.num_drafts"),
    EngineMetric("vllm:spec_decode_num_draft_tokens_total", "counter", "Proposed tokens verified.",
                 "spec_decoding.num_draft_tokens"),
    EngineMetric("vllm:spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens accepted.",
                 "spec_decoding.num_accepted_tokens"),
    _stat("spec_acceptance_rate", "spec_decoding.acceptance_rate"),
    _stat("spec_mean_accepted_length", "spec_decoding.mean_accepted_length"),
)
# EngineStats fields deliberately not exported (the free count is total - used), and the structured
# output fields render_metrics writes itself (labelled by kind, a histogram)
UNEXPORTED_FIELDS = frozenset({"kv_cache.kv_blocks_free", "spec_decoding.accepted_per_position"}) | STRUCTURED_FIELDS


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


def render_metrics(engine: EngineClient, model_name: str, rejections: dict[str, int] | None = None) -> str:
    from engine.dp.metrics import replica_stats, write_dp_metrics

    w = _Writer({"model_name": model_name})
    stats = engine.get_stats()
    per_replica = replica_stats(engine)  # data parallel: each replica's too, labelled engine="i"
    for metric in ENGINE_METRICS:
        w.scalar(metric.name, metric.kind, metric.help, metric.value(stats))
        for label, s in per_replica:
            w.sample(metric.name, metric.value(s), engine=label)
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
    write_structured_output_metrics(w, stats.structured_output)
    write_dp_metrics(w, engine)
    if rejections is not None:
        from engine.entrypoints.openai.limits import REJECTION_REASONS

        w.header("vllm:admission_rejections_total", "counter",
                 "Requests and connections refused by admission control, by reason.")
        for reason in sorted(set(REJECTION_REASONS) | set(rejections)):
            w.sample("vllm:admission_rejections_total", rejections.get(reason, 0), reason=reason)
    queued = getattr(engine, "num_queued_requests", None)
    if callable(queued):
        w.scalar("vllm:num_requests_queued", "gauge",
                 "Sequences waiting for the engine (what --max-num-queued-requests caps).", queued())
    return "\n".join(w.lines) + "\n"
