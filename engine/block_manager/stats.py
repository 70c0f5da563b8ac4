"""A snapshot of the KV cache: what KVCacheManager.get_stats() returns, for the engine's stats and
the server's /metrics.

Field names are the keys the stats dict had before stats became typed, so old names still read.
(KVCacheManager keeps its running counters in kv_cache_manager.KVCacheStats; this is the
point-in-time view built from those counters and the block pools.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVCacheStats:
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_blocks_used: int = 0  # held by at least one request
    kv_blocks_cached: int = 0  # free, but still holding a prefix-cache entry
    kv_cache_usage: float = 0.0  # fraction of the blocks in use (1 = full)
    kv_host_blocks_total: int = 0  # swap space, in blocks
    kv_host_blocks_free: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from cached blocks
    prefix_cache_evictions: int = 0
    shared_prompt_tokens: int = 0  # n > 1: prompt tokens a sample took from its first sibling
    cow_copies: int = 0  # blocks copied because a request wrote into a shared block
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_in_cache_hits: int = 0  # swapped-in blocks still cached on the device (no copy)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """The flat dict KVCacheManager.get_stats() returned before it returned this (same order)."""
        out: dict[str, int | float] = {}
        for key, value in asdict(self).items():
            out[key] = value
            if key == "prefix_cache_hits":
                out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out

    def __getitem__(self, key: str) -> int | float:
        """Read access by the old dict keys (``stats["kv_blocks_used"]``), for existing callers."""
        return self.as_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.as_dict()
