"""What a worker remembers about each request between steps (it receives only deltas)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sample.draw import uniform
from engine.sampling_params import SamplingParams


@dataclass
class PenaltyState:
    """Per-request token statistics for the penalties, updated incrementally from the token lists."""

    prompt_mask: torch.Tensor  # [V] bool: token occurs in the prompt
    output_counts: torch.Tensor  # [V] fp32: occurrences in the output so far
    num_counted: int = 0  # output tokens already added to output_counts


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    generator: torch.Generator | None = None
    num_generator_draws: int = 0  # sampling steps drawn from the generator (one per output token)
    penalty: PenaltyState | None = field(default=None, repr=False)
    allowed_mask: torch.Tensor | None = field(default=None, repr=False)  # [V] bool: True = not allowed
    # speculative decoding: the draft's distributions [len, V] for the proposals made for this
    # request's next step (None: none, or chosen deterministically)
    draft_probs: torch.Tensor | None = field(default=None, repr=False)
    pooling_params: Any = None  # set for pooling requests (engine/pooling/pooler.py reads it)

    @classmethod
    def create(cls, data, device: torch.device) -> "CachedRequestState":
        params = data.sampling_params
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        return cls(data.req_id, list(data.prompt_token_ids), list(data.output_token_ids), params, list(data.block_ids), gen,
                   pooling_params=data.pooling_params)

    def penalty_state(self, vocab_size: int, device: torch.device) -> PenaltyState:
        """Prompt mask and output counts, brought up to date with output_token_ids."""
        if self.penalty is None:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in self.prompt_token_ids if 0 <= t < vocab_size], dtype=torch.int64)
            mask[ids.to(device)] = True
            self.penalty = PenaltyState(mask, torch.zeros(vocab_size, dtype=torch.float32, device=device))
        p = self.penalty
        n = len(self.output_token_ids)
        if p.num_counted < n:
            new = torch.tensor(self.output_token_ids[p.num_counted : n], dtype=torch.int64, device=device)
            p.output_counts.index_add_(0, new, torch.ones(len(new), dtype=torch.float32, device=device))
            p.num_counted = n
        return p

    def allowed_token_mask(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        if self.allowed_mask is None:
            mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(self.sampling_params.allowed_token_ids, dtype=torch.int64)
            mask[ids.to(device)] = False
            self.allowed_mask = mask
        return self.allowed_mask

    def seeded_generator(self, vocab_size: int, device: torch.device) -> torch.Generator | None:
        """The request's generator, advanced past the draws of output tokens it already has (a
        request rebuilt after preemption continues the random stream where it left off)."""
        gen = self.generator
        if gen is None:
            return None
        while self.num_generator_draws < len(self.output_token_ids):
            uniform(gen, 1, device)
            self.num_generator_draws += 1
        return gen
