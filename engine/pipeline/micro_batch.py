"""A pipeline step as several micro-batches in flight.

A step's requests are cut into up to M contiguous groups of about equal token counts, and each
group goes through the stages as its own chain of Ray calls, all submitted at once. Each actor runs
its calls in submission order, so while stage 1 computes group 0, stage 0 already computes group 1:
with M groups and P stages the idle share of a step falls from ``1 - 1/P`` to about
``(P - 1) / (M + P - 1)``.

Why splitting a step this way computes what the whole step would:
- every request is in exactly one group, and the groups keep the step's order, so a request that
  reads blocks another writes in this step (a prefix-cache hit on blocks filled this step, an n > 1
  sibling) comes in the same group as the writer or a later one, and every stage runs the groups
  in order;
- the first group carries the step's block copies (swap-out, copy-on-write, swap-in) and the ids of
  finished and preempted requests, so they are applied before any of the step's tokens;
- the last stage samples each group's rows; the outputs are put back together in the step's order.
"""
from __future__ import annotations

from dataclasses import replace

from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput


def split_step(so: SchedulerOutput, num_groups: int) -> list[SchedulerOutput]:
    """``so`` cut into at most ``num_groups`` contiguous groups of requests of about equal token
    counts (a step with fewer requests than groups gives one group per request)."""
    n = len(so.req_ids)
    if num_groups <= 1 or n <= 1:
        return [so]
    bounds = _bounds(so.num_scheduled_tokens, min(num_groups, n))
    return [_group(so, lo, hi, first=g == 0) for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def _bounds(tokens: list[int], k: int) -> list[int]:
    """Cut points 0 = b0 < b1 < ... < bk = len(tokens), each group near total / k tokens and none empty."""
    total, n = sum(tokens), len(tokens)
    bounds, acc, i = [0], 0, 0
    for g in range(1, k):
        target = total * g / k
        # advance at least one request, and leave at least one for each later group
        while i < n - (k - g) and (i < bounds[-1] + 1 or acc + tokens[i] / 2 <= target):
            acc += tokens[i]
            i += 1
        bounds.append(i)
    bounds.append(n)
    return bounds


def _group(so: SchedulerOutput, lo: int, hi: int, first: bool) -> SchedulerOutput:
    ids = so.req_ids[lo:hi]
    keep = set(ids)
    bitmask, rows = None, {}
    if so.grammar_bitmask is not None:
        picked = []
        for rid in ids:
            if rid in so.structured_output_request_ids:
                start = so.structured_output_request_ids[rid]
                count = 1 + len(so.spec_token_ids.get(rid, ()))
                rows[rid] = len(picked)
                picked.extend(range(start, start + count))
        bitmask = so.grammar_bitmask[picked] if picked else None
    return replace(
        so,
        new_requests=[d for d in so.new_requests if d.req_id in keep],
        cached_requests=[d for d in so.cached_requests if d.req_id in keep],
        req_ids=ids,
        num_scheduled_tokens=so.num_scheduled_tokens[lo:hi],
        num_computed_tokens=so.num_computed_tokens[lo:hi],
        token_ids=so.token_ids[lo:hi],
        sample=so.sample[lo:hi],
        spec_token_ids={r: t for r, t in so.spec_token_ids.items() if r in keep},
        lookahead_slots={r: s for r, s in so.lookahead_slots.items() if r in keep},
        finished_req_ids=so.finished_req_ids if first else set(),
        preempted_req_ids=so.preempted_req_ids if first else set(),
        swap_out=so.swap_out if first else [],
        swap_in=so.swap_in if first else [],
        copy_blocks=so.copy_blocks if first else [],
        grammar_bitmask=bitmask if rows else None,
        structured_output_request_ids=rows,
    )


def merge_outputs(outputs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """The groups' outputs as the whole step's, in its order."""
    if len(outputs) == 1:
        return outputs[0]
    merged = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
    for out in outputs:
        merged.req_ids += out.req_ids
        merged.sampled_token_ids += out.sampled_token_ids
        merged.logprobs += out.logprobs if out.logprobs else [None] * len(out.req_ids)
        merged.prompt_logprobs.update(out.prompt_logprobs)
        merged.draft_token_ids.update(out.draft_token_ids)
        merged.pooler_output.update(out.pooler_output)
    if not any(lp is not None for lp in merged.logprobs):
        merged.logprobs = []
    return merged
