"""Turns the logits of the sampled positions into tokens, vectorised over the batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sample.metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N, 1 + k]: the sampled token's, then the top k
    logprob_token_ids: torch.Tensor | None = None  # [N, 1 + k]
    logprob_ranks: torch.Tensor | None = None  # [N] rank of the sampled token


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k and nucleus top-p set."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        # the k-th largest value is at index vocab - k of the ascending sort
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Samples one token per row: argmax(p / q) with q ~ Exp(1) is a draw from p.
    Seeded rows draw q from their own generator, so their result ignores the rest of the batch."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        greedy = logits.argmax(dim=-1) if not meta.all_random else None
        if meta.all_greedy:
            tokens = greedy
        else:
            scaled = logits.div(meta.temperature.unsqueeze(1))
            scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p)
            sampled = random_sample(scaled.softmax(dim=-1), meta.generators)
            tokens = sampled if meta.all_random else torch.where(meta.greedy_mask, greedy, sampled)
        out = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            k = meta.max_num_logprobs
            top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k > 0 else (raw_logprobs[:, :0], tokens[:, None][:, :0])
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1))
            out.logprobs = torch.cat([chosen, top_vals], dim=1)
            out.logprob_token_ids = torch.cat([tokens.unsqueeze(1), top_ids], dim=1)
            out.logprob_ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        return out
