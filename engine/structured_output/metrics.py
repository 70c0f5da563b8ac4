"""The structured-output families of the server's /metrics (written after the request histograms)."""
from __future__ import annotations

import math
from typing import Any

from engine.structured_output.params import KINDS
from engine.structured_output.stats import COMPILE_BUCKETS, StructuredOutputStats

# (name, type, HELP) in output order: tests/server/golden_metrics.py lists them too
FAMILIES = (
    ("vllm:structured_output_requests_total", "counter", "Constrained requests, by constraint kind."),
    ("vllm:structured_output_grammar_cache_hits_total", "counter",
     "Constrained requests whose grammar was already compiled."),
    ("vllm:structured_output_grammar_cache_misses_total", "counter",
     "Constrained requests that waited for their grammar to compile."),
    ("vllm:structured_output_compile_failures_total", "counter",
     "Grammar compiles that failed (bad constraints and timeouts)."),
    ("vllm:structured_output_compile_time_seconds", "histogram", "Time to compile a grammar."),
)
# EngineStats fields written here rather than through ENGINE_METRICS (labelled or histogram)
FIELDS = frozenset(
    [f"structured_output.requests_{k}" for k in KINDS]
    + [f"structured_output.{f}" for f in ("grammar_cache_hits", "grammar_cache_misses", "compile_failures",
                                          "compile_timeouts", "compile_seconds_sum", "compile_seconds_count")]
)


def write_metrics(w: Any, stats: StructuredOutputStats) -> None:
    """``w``: the /metrics writer (header / sample / scalar)."""
    (req, kind, help_), *scalars, (hist, _, hist_help) = FAMILIES
    w.header(req, kind, help_)
    for k in KINDS:
        w.sample(req, getattr(stats, f"requests_{k}"), kind=k)
    for (name, kind, help_), value in zip(scalars, (stats.grammar_cache_hits, stats.grammar_cache_misses,
                                                    stats.compile_failures)):
        w.scalar(name, kind, help_, value)
    w.header(hist, "histogram", hist_help)
    total = 0
    for bound, count in zip((*COMPILE_BUCKETS, math.inf), stats.compile_seconds_buckets):
        total += count
        w.sample(f"{hist}_bucket", total, le="+Inf" if bound == math.inf else repr(float(bound)))
    w.sample(f"{hist}_sum", stats.compile_seconds_sum)
    w.sample(f"{hist}_count", stats.compile_seconds_count)
