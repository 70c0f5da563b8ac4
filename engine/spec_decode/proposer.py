"""The interface every speculative proposer implements, and the choice of one at start-up.

The model runner owns its proposer (engine/worker/model_runner.py): right after a step sampled a
request, it asks for up to ``max_drafts`` proposals for the next step. The token ids go back to
the scheduler in the step's output; the draft's distributions, where the method has them, stay in
the worker for the step that verifies those proposals.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from engine.config import EngineConfig


@dataclass
class DraftRequest:
    """One request to propose for. The target's K/V is written for every token but the last."""

    req_id: str
    token_ids: list[int]  # prompt and output so far
    block_ids: list[int]  # its block table (a draft model addresses its own cache through it)
    max_drafts: int  # at least 1
    sampling_params: SamplingParams


@dataclass
class Drafts:
    """Per request (in the order asked): proposed token ids, and the distributions ``[len, V]`` they
    were drawn from (None: chosen deterministically, verified as greedy choices are)."""

    token_ids: list[list[int]] = field(default_factory=list)
    probs: list[torch.Tensor | None] = field(default_factory=list)


class Proposer(ABC):
    writes_kv: bool = False  # its proposals need K/V slots past a step (the scheduler's lookahead)

    def load(self, show_progress: bool = False) -> None:
        """Loads what it runs (a draft model's weights) before the KV cache is sized."""

    def kv_bytes_per_block(self) -> int:
        """Bytes of its own cache per KV block of the target (0: it keeps none)."""
        return 0

    def weight_bytes(self) -> int:
        """Bytes of the parameters it holds on this rank (a draft model's shard)."""
        return 0

    def init_cache(self, num_blocks: int) -> None:
        """Allocates its cache: one block per target block, addressed by the target's block ids."""

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> Drafts: ...

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drops what it keeps for finished requests."""

    def reset(self, req_ids: Iterable[str]) -> None:
        """Preempted requests: their blocks were freed or moved, so any K/V it wrote is gone."""


def make_proposer(spec: SpeculativeConfig, config: "EngineConfig", device: torch.device) -> Proposer:
    if spec.uses_draft_model:
        from engine.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(spec, config, device)
    from engine.spec_decode.ngram import NgramProposer

    return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
