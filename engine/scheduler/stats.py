"""The scheduler's counters, exported through LLMEngine.get_stats() (and the server's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_recompute_preemptions: int = 0
    num_swap_preemptions: int = 0
    num_priority_preemptions: int = 0  # running requests displaced by a higher-priority arrival
    num_swap_ins: int = 0
    num_forked_samples: int = 0  # n > 1 samples that shared a sibling's computed prompt
    num_forked_beams: int = 0  # beam continuations that forked a finished beam's blocks
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # the last step's batch composition
    last_num_decodes: int = 0
    last_num_prefills: int = 0
    last_num_scheduled_tokens: int = 0
    last_num_preempted: int = 0
    last_num_running: int = 0
    last_num_waiting: int = 0
    last_num_swapped: int = 0

    def snapshot(self) -> "SchedulerStats":
        """A copy that later steps do not change (stats are read on other threads)."""
        return replace(self)
