"""Runner side of speculative decoding: score every proposed position in the step's forward pass
and keep the tokens the rejection sampler accepts.

A verifying request's scheduled tokens are its last real token followed by its m proposals; the
hidden states of those m + 1 positions give the target's distributions for the m proposals and
the bonus token. Each row is processed exactly as the sampler would process that position
one token at a time: its logits processors (penalties, bad words, min_tokens) see the output
extended by the proposals before it.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from engine.sample.metadata import SamplingMetadata
from engine.sample.sampler import Sampler, apply_logits_processors, gather_logprobs
from engine.scheduler.output import SchedulerOutput
from engine.spec_decode.rejection_sampler import SpecBatch, greedy_verify, random_verify
from engine.structured_output.apply import attach_grammar, processed_logprobs


def _row_states(state, spec: list[int]) -> list:
    """One sampling state per verified position: the request's state as it would be after
    accepting the proposals before that position. Never the real state: the verifier draws its
    own random numbers from the request's generator."""
    params = state.sampling_params
    needs_history = params.has_penalties or params.min_tokens or params.bad_words_token_ids
    rows = []
    for j in range(len(spec) + 1):
        out = state.output_token_ids + spec[:j] if (needs_history and j) else state.output_token_ids
        rows.append(
            replace(state, output_token_ids=out, generator=None, penalty=None if needs_history else state.penalty)
        )
    return rows


def verify_spec_rows(
    compute_logits, hidden: torch.Tensor, so: SchedulerOutput, query_start_loc: list[int],
    rows: list[int], requests: dict, sampled: list, logprobs: list, device: torch.device,
) -> None:
    """Fills ``sampled[i]`` (and ``logprobs[i]``) for each verifying batch row ``i`` in ``rows``; the
    draft's distributions come from the request states, where the runner kept them."""
    greedy = [i for i in rows if requests[so.req_ids[i]].sampling_params.is_greedy]
    random_ = [i for i in rows if not requests[so.req_ids[i]].sampling_params.is_greedy]
    for group in (greedy, random_):
        if group:
            _verify_group(compute_logits, hidden, so, query_start_loc, group, requests, sampled, logprobs, device)


def _verify_group(compute_logits, hidden, so, qsl, group, requests, sampled, logprobs, device) -> None:
    states, specs, row_states, indices = [], [], [], []
    for i in group:
        rid = so.req_ids[i]
        state, spec = requests[rid], list(so.spec_token_ids[rid])
        states.append(state)
        specs.append(spec)
        row_states.extend(_row_states(state, spec))
        end = qsl[i + 1]
        indices.extend(range(end - 1 - len(spec), end))
    logits = compute_logits(hidden.index_select(0, torch.tensor(indices, dtype=torch.int64, device=hidden.device)))
    logits = logits.float()
    vocab = logits.shape[-1]
    meta = SamplingMetadata.build(row_states, vocab, device)
    attach_grammar(meta, so, [(so.req_ids[i], j) for i, s in zip(group, specs) for j in range(len(s) + 1)],
                   row_states, device)  # structured outputs: each position's grammar mask
    raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
    logits = apply_logits_processors(logits, meta)
    if raw_logprobs is not None and meta.grammar_rows is not None:
        processed_logprobs(raw_logprobs, logits, meta)
    batch = SpecBatch(
        draft_token_ids=specs,
        draft_probs=[_draft_probs(st.draft_probs, len(s), device) for st, s in zip(states, specs)],
        generators=[s.generator for s in states],
    )
    if meta.all_greedy:
        outs = greedy_verify(batch, logits.argmax(dim=-1).tolist())
    else:
        outs = random_verify(batch, Sampler.random_logits(logits, meta).softmax(dim=-1))
    starts = batch.row_starts()
    if raw_logprobs is not None:
        lp_rows = [s + j for s, toks in zip(starts, outs) for j in range(len(toks))]
        lp_toks = torch.tensor([t for toks in outs for t in toks], dtype=torch.int64, device=logits.device)
        vals, ids, ranks = gather_logprobs(
            raw_logprobs.index_select(0, torch.tensor(lp_rows, dtype=torch.int64, device=logits.device)),
            lp_toks, meta.max_num_logprobs,
        )
        vals, ids, ranks = vals.tolist(), ids.tolist(), ranks.tolist()
    pos = 0
    for i, state, toks in zip(group, states, outs):
        sampled[i] = toks
        state.output_token_ids.extend(toks)
        if state.generator is not None:
            state.num_generator_draws = len(state.output_token_ids)  # the verifier drew for these
        k = state.sampling_params.logprobs
        if raw_logprobs is not None and k is not None:
            entries = []
            for j in range(len(toks)):
                n = len(ids[pos + j]) if k == -1 else 1 + k
                entries.append((ids[pos + j][:n], vals[pos + j][:n], ranks[pos + j]))
            logprobs[i] = entries
        pos += len(toks)


def _draft_probs(q, m: int, device: torch.device):
    if q is None:
        return None
    return q[:m].to(device)
