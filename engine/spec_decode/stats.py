"""Acceptance statistics, exported through LLMEngine.get_stats() (and the server's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class SpecDecodingStats:
    num_drafts: int = 0  # (request, step) pairs that verified at least one proposal
    num_draft_tokens: int = 0  # proposals verified by the target
    num_accepted_tokens: int = 0  # proposals the target accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose proposal i was accepted

    def observe(self, num_draft: int, num_accepted: int) -> None:
        if num_draft <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft:
            self.accepted_per_position.extend([0] * (num_draft - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying step yields per request on average: accepted proposals plus the
        target's own token (vLLM's mean acceptance length); 0 before any draft."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> "SpecDecodingStats":
        """A copy that later steps do not change (stats are read on other threads)."""
        return replace(self, accepted_per_position=list(self.accepted_per_position))

    def as_dict(self) -> dict:
        """The flat, prefixed keys LLMEngine.get_stats() gave before it returned EngineStats."""
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.acceptance_rate,
            "spec_mean_accepted_length": self.mean_accepted_length,
        }
