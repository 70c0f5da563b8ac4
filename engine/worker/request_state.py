"""What a worker remembers about each request between steps (it receives only deltas)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, data, device: torch.device) -> "CachedRequestState":
        params = data.sampling_params
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        return cls(data.req_id, list(data.prompt_token_ids), list(data.output_token_ids), params, list(data.block_ids), gen)
