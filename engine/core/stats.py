"""EngineStats: one typed snapshot of the engine's state, from LLMEngine.get_stats() to the metrics
layer (the server's /metrics, the periodic throughput log, ``LLM.get_stats()``).

A snapshot is built after a step and never changes afterwards, so another thread may read it while
the engine keeps stepping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.block_manager.stats import KVCacheStats
from engine.scheduler.stats import SchedulerStats
from engine.spec_decode.stats import SpecDecodingStats
from engine.structured_output.stats import StructuredOutputStats

__all__ = ["EngineStats", "KVCacheStats", "SchedulerStats", "SpecDecodingStats"]


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0  # requests (samples) in the running queue
    num_waiting: int = 0
    num_swapped: int = 0  # preempted requests whose blocks are in host memory
    prompt_tokens_total: int = 0  # prefill tokens computed so far
    generation_tokens_total: int = 0  # tokens generated so far
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
    kv_cache: KVCacheStats = field(default_factory=KVCacheStats)
    spec_decoding: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    structured_output: StructuredOutputStats = field(default_factory=StructuredOutputStats)

    def as_dict(self) -> dict[str, int | float]:
        """The flat dict LLMEngine.get_stats() returned before it returned EngineStats."""
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_swapped": self.num_swapped,
            **self.kv_cache.as_dict(),
            **{f"scheduler_{k}": v for k, v in asdict(self.scheduler).items()},
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            **self.spec_decoding.as_dict(),
        }

    def __getitem__(self, key: str) -> int | float:
        """Read access by the old dict keys (``stats["scheduler_num_preemptions"]``), so code written
        against the dict keeps working; new code reads the fields."""
        return self.as_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.as_dict()
