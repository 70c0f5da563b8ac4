"""What the scheduler decides each step; shaped so workers receive only what changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    pooling_params: Any = None  # a pooling request: the worker pools its prompt, samples nothing
    lora_request: Any = None  # engine.lora.request.LoRARequest, or None for the base model


@dataclass
class CachedRequestData:
    """A request the workers already know: only its newly allocated blocks travel, unless
    ``reset_block_ids`` says ``new_block_ids`` is the whole table (after a preemption, a swap-in
    or a copy-on-write replaced blocks in place). Workers keep a preempted request's state (its
    sampling generator included) until it finishes, so a resumed request continues its stream."""

    req_id: str
    new_block_ids: list[int]
    reset_block_ids: bool = False


@dataclass
class SchedulerOutput:
    """One step. ``req_ids[i]`` computes ``num_scheduled_tokens[i]`` tokens, ``token_ids[i]``,
    starting at position ``num_computed_tokens[i]``; a token is sampled after its last one when
    ``sample[i]``. Decode requests (one token, sampled) come first."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    # speculative decoding: req id -> the proposals scheduled after its last real token (the
    # worker that made them keeps the draft's distributions for verifying them)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # req id -> KV slots past this step's tokens, in blocks it holds alone, that a draft model may
    # write its proposals' K/V into (only when the proposer writes K/V)
    lookahead_slots: dict[str, int] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)  # workers drop their state
    preempted_req_ids: set[str] = field(default_factory=set)
    # block copies workers run before the forward pass, in this order: swap_out, copy_blocks, swap_in
    # (all reads of blocks that may have been freed this step come before writes into fresh blocks)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write
    # structured outputs: the allowed tokens of this step's constrained rows, an int32 bitmask
    # [rows, ceil(V / 32)], and req id -> its first row (a request verifying m proposals has m + 1)
    grammar_bitmask: Any = None
    structured_output_request_ids: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.req_ids

    @property
    def has_block_ops(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.copy_blocks)

    @property
    def needs_workers(self) -> bool:
        """Whether workers must see this step even when nothing is scheduled (pending copies,
        or finished requests whose state they should drop)."""
        return bool(self.req_ids or self.has_block_ops or self.finished_req_ids)
