"""The async engine's request-level metrics: outcome counters and latency histograms (TTFT,
inter-token latency, end-to-end), observed on the engine thread and read by /metrics."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from engine.outputs import RequestOutput

# vLLM's buckets for time to first token and inter-token latency (seconds)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Histogram:
    """A cumulative histogram (Prometheus semantics); observed on the engine thread, read anywhere."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)], sum, count); the last bound is inf."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, out = 0, []
        for bound, c in zip((*self.buckets, float("inf")), counts):
            cumulative += c
            out.append((bound, cumulative))
        return out, total, cumulative


@dataclass
class EngineMetrics:
    """The async engine's own counters: request outcomes and latency histograms."""

    requests_added: int = 0
    requests_failed: int = 0  # in flight when the engine died
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def record_finished(self, out: RequestOutput, latency: float) -> None:
        reasons = [o.finish_reason for o in out.outputs] if isinstance(out, RequestOutput) else [out.finish_reason]
        # a request counts once: aborted if any sample was, else by its first sample
        reason = "abort" if "abort" in reasons else (reasons[0] or "abort")
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if reason != "abort":
            self.e2e.observe(latency)
