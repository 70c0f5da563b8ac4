"""Adding up the EngineStats of several replicas: counters and gauges add, per-position lists and
bucket tuples add element by element, fractions are recomputed from the added parts."""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

from engine.core.stats import EngineStats

T = TypeVar("T")


def _add(a: Any, b: Any) -> Any:
    if is_dataclass(a):
        return replace(a, **{f.name: _add(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})
    if isinstance(a, (list, tuple)):
        n = max(len(a), len(b))
        out = [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
        return type(a)(out)
    return a + b


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    if not stats:
        return EngineStats()
    total = stats[0]
    for s in stats[1:]:
        total = _add(total, s)
    kv = total.kv_cache
    usage = kv.kv_blocks_used / kv.kv_blocks_total if kv.kv_blocks_total else 0.0
    return replace(total, kv_cache=replace(kv, kv_cache_usage=usage))
