"""The one object that carries a request through the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    WAITING_FOR_FSM = enum.auto()  # queued, its grammar still compiling (engine/structured_output/)
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting again, its KV freed (recompute) or swapped out to host memory
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self.value >= RequestStatus.FINISHED_STOPPED.value

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


# The token a sampler returns for a row whose logits processors masked every token (bad words and
# allowed_token_ids that together exclude all, a grammar with no legal continuation): the
# scheduler ends that request with finish_reason "error" and this reason, instead of emitting 0.
NO_TOKEN = -1
NO_TOKEN_REASON = ("no token can be sampled: the request's constraints (allowed_token_ids, bad_words, "
                   "min_tokens, logit_bias or structured output) masked every token")


@dataclass(eq=False)  # compared by identity: requests live in lists that are searched often
class Request:
    """One sequence being generated: its tokens, progress, KV blocks and state.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the scheduler decides each
    step how many more to compute. ``block_ids`` is the request's block table, read from the
    KV-cache manager's list.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    parent_id: str | None = None  # for n > 1: the user-facing request this sample belongs to
    sample_index: int = 0
    fork_from: str | None = None  # n > 1: the sibling whose computed prompt this sample shares
    # beam search (engine/scheduler/retained_kv.py): a finished request whose blocks this one
    # continues, and whether this one keeps its blocks for its own continuations when it finishes
    kv_source: str | None = None
    retain_kv: bool = False

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first scheduling
    # its block table: the KV-cache manager's own list for it (set and changed only by the manager)
    kv_blocks: list = field(default_factory=list, repr=False)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full blocks so far
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    resumed_step: int = -1  # step at which it was last (re)admitted: never preempt it in that step
    spec_token_ids: list[int] = field(default_factory=list)  # proposals to verify this step
    metrics: RequestMetrics | None = None
    # structured outputs: its grammar and matcher (engine/structured_output/manager.py), or None
    structured_output_request: Any = None
    # LoRA: the adapter (engine.lora.request.LoRARequest) its tokens are computed with, or None
    lora_request: Any = None
    # pooling (engine/pooling/): prefill only, ends when the prompt is computed; MEAN/CLS pooling
    # must compute every position, so such requests do not read the prefix cache
    pooling_params: Any = None
    skip_reading_prefix_cache: bool = False

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def block_ids(self) -> list[int]:
        """The block table as ids (read from the manager's table, never stored twice)."""
        return [b.block_id for b in self.kv_blocks]

    @property
    def lora_int_id(self) -> int | None:
        """The adapter's id (prefix-cache salt, slot accounting), None for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens  # resolved to an int when the request is added
