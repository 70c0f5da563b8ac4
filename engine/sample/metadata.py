"""Batched sampling parameters for one step, built from the per-request SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """One row per sampled request. Fields a step does not need are None, so requests that don't
    use an option don't pay for it."""

    temperature: torch.Tensor  # [N] fp32; greedy rows hold 1.0 (they are argmaxed)
    greedy_mask: torch.Tensor | None  # [N] bool; None when every row is greedy or none is
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None = None  # [N]
    top_k: torch.Tensor | None = None  # [N] int64, vocab size where disabled
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    max_num_logprobs: int | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> "SamplingMetadata":
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], dtype=torch.float32, device=device)
        top_p = top_k = None
        if not all_greedy:
            if any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g):
                top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            if any(0 < p.top_k < vocab_size for p, g in zip(params, greedy) if not g):
                top_k = torch.tensor(
                    [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], dtype=torch.int64, device=device
                )
        gens = {i: g for i, g in enumerate(generators) if g is not None and not greedy[i]}
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=temps,
            greedy_mask=None if (all_greedy or all_random) else torch.tensor(greedy, device=device),
            all_greedy=all_greedy,
            all_random=all_random,
            top_p=top_p,
            top_k=top_k,
            generators=gens,
            max_num_logprobs=max(logprobs) if logprobs else None,
        )
