"""Turns the logits of the sampled positions into tokens, vectorised over the batch.

Order (vLLM's): raw logprobs; allowed_token_ids; bad words and min_tokens bans; logit_bias;
penalties; the structured-output grammar mask; then greedy rows take the argmax, random rows apply
temperature, min_p, top-k, top-p and draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import NO_TOKEN
from engine.sample.draw import random_sample
from engine.sample.metadata import PenaltyBatch, SamplingMetadata
from engine.structured_output.apply import apply_grammar_bitmask, processed_logprobs


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64; NO_TOKEN where the row's constraints left nothing to sample
    logprobs: torch.Tensor | None = None  # [N, 1 + k]: the sampled token's, then the top k
    logprob_token_ids: torch.Tensor | None = None  # [N, 1 + k]
    logprob_ranks: torch.Tensor | None = None  # [N] rank of the sampled token


def apply_penalties(logits: torch.Tensor, pen: PenaltyBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (divides positive logits, multiplies
    negative ones), then frequency (per output occurrence) and presence (once per output token)."""
    rows = logits.index_select(0, pen.rows)
    seen_out = pen.output_counts > 0
    seen = pen.prompt_mask | seen_out
    rep = torch.where(seen, pen.repetition, 1.0)
    rows = torch.where(rows > 0, rows / rep, rows * rep)
    rows = rows - pen.frequency * pen.output_counts - pen.presence * seen_out
    logits.index_copy_(0, pen.rows, rows)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


# top-p looks for its nucleus among this many most likely tokens first (see apply_top_p)
TOP_P_CANDIDATES = 256


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps each row's k largest logits (ties with the k-th kept). Rows holding the vocabulary
    size are untouched. Needs only the k-th value: a topk, not a full sort."""
    vocab = logits.shape[-1]
    active = top_k < vocab
    if not bool(active.any()):
        return logits
    max_k = int(top_k[active].max())
    top_vals = logits.topk(max_k, dim=-1).values
    kth = top_vals.gather(1, (top_k - 1).clamp(0, max_k - 1).unsqueeze(1))
    kth = kth.masked_fill(~active.unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_by_sort(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The reference nucleus rule (transformers' and vLLM's): sort ascending, drop tokens whose
    cumulative probability is <= 1 - top_p, always keep the most likely."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    return torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keeps a token while the mass of the tokens more likely than it is < top_p.

    A token outside the top K has at least the top K's mass above it, so when that mass reaches
    top_p the nucleus lies inside the top K: a topk of K instead of a sort of the vocabulary (on CPU
    a [64, 49152] sort costs about 5-10x a top-256). Rows whose top K falls short are sorted.
    The kept set equals the sort's except where a token's mass above is within float rounding of
    top_p (the short candidate sum is the more accurate of the two)."""
    vocab = logits.shape[-1]
    active = top_p < 1.0  # rows without top-p in a batch where others use it
    probs = logits.softmax(dim=-1)
    top_probs, top_ids = probs.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
    covered = (top_probs.sum(dim=-1) >= top_p) | ~active
    mass_above = top_probs.cumsum(dim=-1) - top_probs
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top_ids, mass_above < top_p.unsqueeze(1))
    keep |= ~active.unsqueeze(1)
    out = logits.masked_fill(~keep, float("-inf"))
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(1)
        out.index_copy_(0, rows, _top_p_by_sort(logits.index_select(0, rows), top_p.index_select(0, rows)))
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k set, then outside the nucleus of what is left."""
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p)
    return logits


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first maximum on ties, like torch.argmax). On CPU, ``max(dim).indices``
    is several times faster than ``argmax`` for [rows, 49152] fp32."""
    return x.max(dim=-1).indices


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The token-level options that can change even a greedy choice; in place on fp32 logits."""
    if meta.allowed_rows is not None:
        rows = logits.index_select(0, meta.allowed_rows).masked_fill_(meta.allowed_mask, float("-inf"))
        logits.index_copy_(0, meta.allowed_rows, rows)
    if meta.banned_rows is not None:
        logits.index_put_((meta.banned_rows, meta.banned_tokens), torch.tensor(float("-inf"), device=logits.device))
    if meta.bias_rows is not None:
        logits.index_put_((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)
    if meta.penalties is not None:
        apply_penalties(logits, meta.penalties)
    if meta.grammar_bitmask is not None:  # one vectorised call for every constrained row
        apply_grammar_bitmask(logits, meta)
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        # logprobs are those of the raw model output, before any processing (vLLM's default)
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        logits = apply_logits_processors(logits, meta)
        tokens = self.sample(logits, meta)
        chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)  # -inf (or NaN) only if nothing was allowed
        out = SamplerOutput(token_ids=tokens.masked_fill(~torch.isfinite(chosen), NO_TOKEN))
        if raw_logprobs is not None and meta.grammar_rows is not None:
            processed_logprobs(raw_logprobs, logits, meta)  # constrained rows: the distribution sampled from
        if raw_logprobs is not None:
            out.logprobs, out.logprob_token_ids, out.logprob_ranks = gather_logprobs(
                raw_logprobs, tokens, meta.max_num_logprobs
            )
        return out

    @staticmethod
    def random_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The random rows' logits after temperature, min_p, top-k and top-p: their softmax is
        the distribution each row draws from."""
        rand_logits = logits if meta.random_rows is None else logits.index_select(0, meta.random_rows)
        scaled = rand_logits.div(meta.temperature.unsqueeze(1))
        if meta.min_p is not None:
            scaled = apply_min_p(scaled, meta.min_p)
        return apply_top_k_top_p(scaled, meta.top_k, meta.top_p)

    @classmethod
    def sample(cls, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.all_greedy:
            return argmax(logits)
        scaled = cls.random_logits(logits, meta)
        sampled = random_sample(scaled.softmax(dim=-1), meta.generators)
        if meta.random_rows is None:
            return sampled
        tokens = argmax(logits)
        return tokens.index_copy_(0, meta.random_rows, sampled)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen token's logprob and the top k per row, with the chosen token's rank: the number
    of tokens at least as likely, itself included (vLLM's rule: ties count against it)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
    else:
        top_vals = logprobs[:, :0]
        top_ids = token_ids.unsqueeze(1)[:, :0]
    ranks = (logprobs >= chosen).sum(dim=-1)
    return torch.cat([chosen, top_vals], dim=1), torch.cat([token_ids.unsqueeze(1), top_ids], dim=1), ranks
