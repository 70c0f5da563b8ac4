"""Structured-output counters for EngineStats and /metrics."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# compile-time histogram buckets, seconds (upper bounds; the last is +Inf)
COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class StructuredOutputStats:
    requests_json: int = 0
    requests_json_object: int = 0
    requests_regex: int = 0
    requests_choice: int = 0
    requests_grammar: int = 0
    requests_structural_tag: int = 0
    grammar_cache_hits: int = 0
    grammar_cache_misses: int = 0
    compile_failures: int = 0  # bad constraints and timeouts
    compile_timeouts: int = 0
    compile_seconds_sum: float = 0.0
    compile_seconds_count: int = 0
    compile_seconds_buckets: tuple[int, ...] = field(default=(0,) * (len(COMPILE_BUCKETS) + 1))

    def as_dict(self) -> dict[str, int | float]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "compile_seconds_buckets"}
        return {f"structured_output_{k}": v for k, v in d.items()}


class StructuredOutputCounters:
    """Mutable counters, updated from the engine thread and the compile threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._buckets = [0] * (len(COMPILE_BUCKETS) + 1)

    def add(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def observe_compile(self, seconds: float) -> None:
        with self._lock:
            self._buckets[bisect.bisect_left(COMPILE_BUCKETS, seconds)] += 1
            self._values["compile_seconds_sum"] = self._values.get("compile_seconds_sum", 0.0) + seconds
            self._values["compile_seconds_count"] = self._values.get("compile_seconds_count", 0) + 1

    def snapshot(self) -> StructuredOutputStats:
        with self._lock:
            return StructuredOutputStats(**self._values, compile_seconds_buckets=tuple(self._buckets))
