"""Batched sampling parameters for one step, built from the per-request states.

Every option is optional: a field stays None unless some row of this step uses it, and options
that act on single rows (penalties, allowed ids, the random-sampling filters) carry the indices of
the rows that use them, so requests that don't use an option don't pay for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


@dataclass
class PenaltyBatch:
    rows: torch.Tensor  # [M] int64 rows of the batch
    presence: torch.Tensor  # [M, 1]
    frequency: torch.Tensor  # [M, 1]
    repetition: torch.Tensor  # [M, 1]
    prompt_mask: torch.Tensor  # [M, V] bool
    output_counts: torch.Tensor  # [M, V] fp32


@dataclass
class SamplingMetadata:
    """One row per sampled request."""

    all_greedy: bool
    all_random: bool
    # rows that sample randomly; None when every row does (then the tensors below cover all rows)
    random_rows: torch.Tensor | None = None
    temperature: torch.Tensor | None = None  # [R] fp32, per random row
    top_p: torch.Tensor | None = None  # [R]
    top_k: torch.Tensor | None = None  # [R] int64, vocab size where disabled
    min_p: torch.Tensor | None = None  # [R]
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # random row -> seeded generator
    max_num_logprobs: int | None = None
    # token-level logits processors, applied before greedy/random sampling
    allowed_rows: torch.Tensor | None = None  # [A]
    allowed_mask: torch.Tensor | None = None  # [A, V] bool: True = not allowed
    banned_rows: torch.Tensor | None = None  # [B] (row, token) pairs set to -inf: bad words, min_tokens
    banned_tokens: torch.Tensor | None = None  # [B]
    bias_rows: torch.Tensor | None = None  # [C] logit_bias entries
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    penalties: PenaltyBatch | None = None
    # structured outputs, set by attach_grammar (engine/structured_output/apply.py): one int32
    # bitmask row per logits row, the rows it constrains, and those where min_tokens bans the stop ids
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] | None = None
    grammar_min_tokens_rows: list[int] | None = None
    grammar_stop_ids: dict[int, list[int]] | None = None

    @classmethod
    def build(cls, states: list, vocab_size: int, device: torch.device) -> "SamplingMetadata":
        """``states`` are CachedRequestStates (prompt/output ids, params, generator), one per row."""
        params: list[SamplingParams] = [s.sampling_params for s in states]
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        meta = cls(all_greedy=all_greedy, all_random=all_random)

        if not all_greedy:
            rand = [i for i, g in enumerate(greedy) if not g]
            if not all_random:
                meta.random_rows = torch.tensor(rand, dtype=torch.int64, device=device)
            rp = [params[i] for i in rand]
            meta.temperature = torch.tensor([p.temperature for p in rp], dtype=torch.float32, device=device)
            if any(p.top_p < 1.0 for p in rp):
                meta.top_p = torch.tensor([p.top_p for p in rp], dtype=torch.float32, device=device)
            if any(0 < p.top_k < vocab_size for p in rp):
                meta.top_k = torch.tensor(
                    [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in rp], dtype=torch.int64, device=device
                )
            if any(p.min_p > 0.0 for p in rp):
                meta.min_p = torch.tensor([p.min_p for p in rp], dtype=torch.float32, device=device)
            for j, i in enumerate(rand):
                gen = states[i].seeded_generator(vocab_size, device)
                if gen is not None:
                    meta.generators[j] = gen
                    states[i].num_generator_draws += 1  # the sampler draws once for this row

        nums = [p.logprobs for p in params if p.logprobs is not None]
        if nums:
            meta.max_num_logprobs = vocab_size if -1 in nums else max(nums)

        # allowed_token_ids
        allowed = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
        if allowed:
            meta.allowed_rows = torch.tensor(allowed, dtype=torch.int64, device=device)
            meta.allowed_mask = torch.stack([states[i].allowed_token_mask(vocab_size, device) for i in allowed])

        # bad words and min_tokens: single (row, token) bans
        b_rows: list[int] = []
        b_toks: list[int] = []
        for i, (s, p) in enumerate(zip(states, params)):
            if p.bad_words_token_ids:
                for tok in _banned_bad_word_tokens(p.bad_words_token_ids, s.output_token_ids):
                    b_rows.append(i)
                    b_toks.append(tok)
            if p.min_tokens and len(s.output_token_ids) < p.min_tokens:
                for tok in p.all_stop_token_ids:
                    if 0 <= tok < vocab_size:
                        b_rows.append(i)
                        b_toks.append(tok)
        if b_rows:
            meta.banned_rows = torch.tensor(b_rows, dtype=torch.int64, device=device)
            meta.banned_tokens = torch.tensor(b_toks, dtype=torch.int64, device=device)

        # logit_bias
        c_rows, c_toks, c_vals = [], [], []
        for i, p in enumerate(params):
            if p.logit_bias:
                for tok, v in p.logit_bias.items():
                    if 0 <= tok < vocab_size:
                        c_rows.append(i)
                        c_toks.append(tok)
                        c_vals.append(v)
        if c_rows:
            meta.bias_rows = torch.tensor(c_rows, dtype=torch.int64, device=device)
            meta.bias_tokens = torch.tensor(c_toks, dtype=torch.int64, device=device)
            meta.bias_values = torch.tensor(c_vals, dtype=torch.float32, device=device)

        # penalties
        pen = [i for i, p in enumerate(params) if p.has_penalties]
        if pen:
            ps = [states[i].penalty_state(vocab_size, device) for i in pen]

            def col(name: str) -> torch.Tensor:
                return torch.tensor([getattr(params[i], name) for i in pen], dtype=torch.float32, device=device)[:, None]

            meta.penalties = PenaltyBatch(
                rows=torch.tensor(pen, dtype=torch.int64, device=device),
                presence=col("presence_penalty"),
                frequency=col("frequency_penalty"),
                repetition=col("repetition_penalty"),
                prompt_mask=torch.stack([p.prompt_mask for p in ps]),
                output_counts=torch.stack([p.output_counts for p in ps]),
            )
        return meta


def _banned_bad_word_tokens(bad_words: list[list[int]], output: list[int]) -> list[int]:
    """A bad word's last token is banned when the output ends with the rest of the word (vLLM's
    rule: single-token words are always banned, longer ones only to complete them)."""
    banned = []
    for seq in bad_words:
        prefix_len = len(seq) - 1
        if prefix_len > len(output):
            continue
        if prefix_len == 0 or output[-prefix_len:] == seq[:-1]:
            banned.append(seq[-1])
    return banned
