"""Worker side of structured outputs: the step's bitmask rows put into a SamplingMetadata, applied to
the logits in one vectorised call (after logit bias, bad words and penalties, before temperature /
top-k / top-p), and the logprobs of constrained rows taken from the distribution sampled from."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.sample.metadata import SamplingMetadata
    from engine.scheduler.output import SchedulerOutput


def attach_grammar(meta: SamplingMetadata, so: SchedulerOutput, rows: list[tuple[str, int]], states: list,
                   device: torch.device) -> None:
    """``rows[i] = (req id, j)``: logits row i scores the request's j-th position of this step (0
    unless it verifies proposals). Sets ``meta.grammar_bitmask`` (one bitmask row per logits row)
    and ``meta.grammar_rows`` (the constrained ones) when any row is constrained."""
    starts = so.structured_output_request_ids
    if so.grammar_bitmask is None or not starts:
        return
    logit_rows, mask_rows = [], []
    for i, (rid, j) in enumerate(rows):
        start = starts.get(rid)
        if start is not None:
            logit_rows.append(i)
            mask_rows.append(start + j)
    if not logit_rows:
        return
    src = so.grammar_bitmask
    if mask_rows == list(range(len(rows))) and src.shape[0] == len(rows):
        bitmask = src
    else:
        bitmask = torch.full((len(rows), src.shape[1]), -1, dtype=torch.int32)
        bitmask[logit_rows] = src[mask_rows]
    meta.grammar_bitmask = bitmask.to(device, non_blocking=True)
    meta.grammar_rows = logit_rows
    # rows where min_tokens bans the stop tokens: if the grammar allows nothing else, it wins
    meta.grammar_min_tokens_rows = [
        i for i in logit_rows
        if states[i].sampling_params.min_tokens and len(states[i].output_token_ids) < states[i].sampling_params.min_tokens
    ] or None
    meta.grammar_stop_ids = {i: sorted(states[i].sampling_params.all_stop_token_ids) for i in (meta.grammar_min_tokens_rows or ())}


def _cpu_kernel(logits: torch.Tensor):
    """engine/kernels/cpu/bitmask_cpu.c for fp32 CPU logits (xgrammar's CPU apply is several times
    slower on a large vocabulary); None elsewhere."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        return None
    from engine.kernels.cpu import bitmask_ops

    return bitmask_ops.load()


def apply_grammar_bitmask(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Masks (to -inf) every token the grammar does not allow next, in place."""
    import xgrammar as xgr

    rows = meta.grammar_rows
    kernel = _cpu_kernel(logits)
    if kernel is not None:  # bitmask row i belongs to logits row i
        kernel.apply(logits, meta.grammar_bitmask, rows, rows)
    else:
        indices = None if len(rows) == logits.shape[0] else rows
        xgr.apply_token_bitmask_inplace(logits, meta.grammar_bitmask, vocab_size=logits.shape[-1], indices=indices)
    for i in meta.grammar_min_tokens_rows or ():
        if bool(torch.isneginf(logits[i]).all()):
            # only ending is left, and min_tokens banned it: the grammar's end wins
            words = meta.grammar_bitmask[i].tolist()
            for t in meta.grammar_stop_ids[i]:
                if t < logits.shape[-1] and (words[t // 32] >> (t % 32)) & 1:
                    logits[i, t] = 0.0


def processed_logprobs(raw: torch.Tensor, logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Constrained rows report the logprobs of the distribution they were sampled from (after the
    mask, and for random rows after temperature / min_p / top-k / top-p): vLLM's
    ``processed_logprobs``. In place on ``raw``."""
    from engine.sample.sampler import Sampler

    rows = meta.grammar_rows
    if meta.all_greedy:
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        raw.index_copy_(0, idx, logits.index_select(0, idx).log_softmax(dim=-1))
        return
    scaled = Sampler.random_logits(logits, meta).log_softmax(dim=-1)
    random_rows = meta.random_rows.tolist() if meta.random_rows is not None else list(range(logits.shape[0]))
    where = {r: k for k, r in enumerate(random_rows)}
    for r in rows:
        k = where.get(r)
        raw[r] = scaled[k] if k is not None else logits[r].log_softmax(dim=-1)
