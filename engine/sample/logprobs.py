"""Prompt logprobs: log-softmax of the logits at prompt positions, for requests that ask for them.

Position p's logits score prompt token p + 1, so a prefill chunk covering positions [s, e) yields
the entries of prompt tokens s + 1 .. min(e, P - 1). The engine disables prefix-cache reuse for
these requests, so every prompt position is computed once (again after a preemption: the entries
are keyed by position, so a recomputation overwrites them with equal values).
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.sample.sampler import gather_logprobs

# (token ids, logprobs, rank of the first): the prompt token first, then the top k
LogprobEntry = tuple[list[int], list[float], int]

_ROWS_PER_SLICE = 256  # bounds the [rows, vocab] logits held at once


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    req_ids: list[str],
    num_scheduled_tokens: list[int],
    num_computed_tokens: list[int],
    query_start_loc: list[int],
    states: dict,
) -> dict[str, tuple[int, list[LogprobEntry]]]:
    """Returns, per request that wants prompt logprobs and has prompt positions in this step,
    (index of the first prompt token scored, its entries)."""
    out: dict[str, tuple[int, list[LogprobEntry]]] = {}
    for i, rid in enumerate(req_ids):
        state = states[rid]
        k = state.sampling_params.prompt_logprobs
        if k is None:
            continue
        prompt = state.prompt_token_ids
        start = num_computed_tokens[i]
        end = min(start + num_scheduled_tokens[i], len(prompt) - 1)
        if start >= end:
            continue
        entries: list[LogprobEntry] = []
        for s in range(start, end, _ROWS_PER_SLICE):
            e = min(s + _ROWS_PER_SLICE, end)
            first_row = query_start_loc[i] + (s - start)
            h = hidden[first_row : first_row + (e - s)]
            logprobs = compute_logits(h).float().log_softmax(dim=-1)
            targets = torch.tensor(prompt[s + 1 : e + 1], dtype=torch.int64, device=logprobs.device)
            kk = logprobs.shape[-1] if k == -1 else k
            vals, ids, ranks = gather_logprobs(logprobs, targets, kk)
            for v, t, r in zip(vals.tolist(), ids.tolist(), ranks.tolist()):
                entries.append((t, v, r))
        out[rid] = (start + 1, entries)
    return out
