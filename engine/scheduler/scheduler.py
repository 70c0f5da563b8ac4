"""Iteration-level continuous batching under a token budget."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.config import SchedulerConfig
from engine.errors import PromptTooLongError
from engine.request import Request, RequestStatus
from engine.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from engine.scheduler.policy import make_policy


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    last_num_decodes: int = 0
    last_num_prefills: int = 0
    last_num_scheduled_tokens: int = 0


@dataclass
class _Batch:
    decodes: list[tuple[Request, int]] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)


class Scheduler:
    """Each step assigns every runnable request a number of tokens to compute.

    Running requests are served first, in policy order, then waiting ones; prefill chunks and
    decodes share one step. When blocks run out, the lowest-priority running request (the most
    recently arrived under fcfs) is preempted by recompute; the first request in policy order can
    always proceed, so the engine never stalls.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.policy = make_policy(config.policy)
        self.block_size = kv_cache.block_size
        # a sequence can never grow past what the whole cache holds
        self.max_model_len = min(config.max_model_len, kv_cache.num_blocks * self.block_size)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._step = 0
        self._sent_blocks: dict[str, int] = {}  # req id -> blocks the workers know of
        self._finished_ids: set[str] = set()

    # ---- admission -------------------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raises PromptTooLongError for a prompt that could never be scheduled."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if num_prompt_tokens > self.config.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens, more than max_model_len={self.config.max_model_len}; "
                "shorten it or raise max_model_len"
            )
        needed = self.kv_cache.blocks_needed(num_prompt_tokens + 1)
        if needed > self.kv_cache.num_blocks:
            raise PromptTooLongError(
                f"the prompt needs {needed} KV blocks but the cache has only {self.kv_cache.num_blocks}; "
                "shorten it or give the KV cache more memory (kv_cache_memory_bytes / num_gpu_blocks_override)"
            )

    def add_request(self, request: Request) -> None:
        self.check_prompt(request.num_prompt_tokens)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params
        if params.max_tokens is None:  # generation then ends at max_model_len
            params.max_tokens = max(self.max_model_len - request.num_prompt_tokens, 1)
        self.requests[request.request_id] = request
        self._insert_waiting(request)

    def _insert_waiting(self, request: Request) -> None:
        self.waiting.insert(self.policy.waiting_insert_index(self.waiting, request), request)

    def _insert_running(self, request: Request) -> None:
        keys = [self.policy.sort_key(r) for r in self.running]
        self.running.insert(bisect.bisect_right(keys, self.policy.sort_key(request)), request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._step += 1
        budget = self.config.max_num_batched_tokens
        batch = _Batch()
        preempted: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            num_new = min(num_new, self.max_model_len - req.num_computed_tokens)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv_cache.allocate_slots(req, num_new):
                victim = self.running.pop()  # lowest in policy order; never one scheduled already
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            else:
                self._add_to_batch(batch, req, num_new)
                budget -= num_new
                i += 1

        admitted: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) + len(admitted) < self.config.max_num_seqs:
            req = self.waiting[0]
            computed = self.kv_cache.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_computed = req.num_computed_tokens + len(computed) * self.block_size
            num_new = req.num_tokens - num_computed
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv_cache.allocate_slots(req, num_new, computed):
                break
            self.waiting.pop(0)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_computed
                req.metrics.first_scheduled_time = time.time()
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            req.resumed_step = self._step
            admitted.append(req)
            self._add_to_batch(batch, req, num_new)
            budget -= num_new
        for req in admitted:
            self._insert_running(req)

        return self._make_output(batch, preempted)

    def _add_to_batch(self, batch: _Batch, req: Request, num_new: int) -> None:
        is_decode = num_new == 1 and req.num_computed_tokens + 1 == req.num_tokens
        (batch.decodes if is_decode else batch.prefills).append((req, num_new))

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        req.metrics.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._sent_blocks.pop(req.request_id, None)
        self._insert_waiting(req)

    def _make_output(self, batch: _Batch, preempted: set[str]) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids, preempted_req_ids=preempted)
        self._finished_ids = set()
        for req, num_new in batch.decodes + batch.prefills:
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start : start + num_new]
            spec = []
            if len(tokens) < num_new:  # the rest are speculative proposals
                spec = req.spec_token_ids[: num_new - len(tokens)]
                out.spec_token_ids[req.request_id] = spec
            out.req_ids.append(req.request_id)
            out.num_scheduled_tokens.append(num_new)
            out.num_computed_tokens.append(start)
            out.token_ids.append(tokens + spec)
            out.sample.append(start + num_new >= req.num_tokens)
            sent = self._sent_blocks.get(req.request_id)
            if sent is None:
                out.new_requests.append(
                    NewRequestData(
                        req.request_id,
                        req.prompt_token_ids,
                        list(req.output_token_ids),
                        req.sampling_params,
                        list(req.block_ids),
                    )
                )
            else:
                out.cached_requests.append(CachedRequestData(req.request_id, req.block_ids[sent:]))
            self._sent_blocks[req.request_id] = len(req.block_ids)
        self.stats.num_steps += 1
        self.stats.last_num_decodes = len(batch.decodes)
        self.stats.last_num_prefills = len(batch.prefills)
        self.stats.last_num_scheduled_tokens = out.total_num_scheduled_tokens
        self.stats.num_decode_tokens += len(batch.decodes)
        self.stats.num_prefill_tokens += out.total_num_scheduled_tokens - len(batch.decodes)
        return out

    # ---- results ---------------------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: list[list[int]]
    ) -> list[tuple[Request, list[int]]]:
        """Advances each scheduled request by its computed tokens and appends sampled tokens.

        ``sampled[i]`` holds the tokens accepted for ``out.req_ids[i]`` (empty when nothing was
        sampled). Returns each request that received tokens with the tokens it kept (none past a
        stop); finished ones have already released their blocks.
        """
        updated = []
        now = time.time()
        for i, req_id in enumerate(out.req_ids):
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            num_spec = len(out.spec_token_ids.get(req_id, ()))
            tokens = sampled[i] if out.sample[i] else []
            # rejected proposals are not computed: their slots are rewritten next step
            num_rejected = max(num_spec - (len(tokens) - 1), 0) if tokens else 0
            req.num_computed_tokens += out.num_scheduled_tokens[i] - num_rejected
            req.spec_token_ids = []
            if not tokens:
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            kept = []
            for tok in tokens:
                req.append_output_token(tok)
                kept.append(tok)
                status = self._check_stop(req, tok)
                if status is not None:
                    self._finish(req, status)
                    break
            updated.append((req, kept))
        return updated

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_requests(self, request_ids: str | list[str], status: RequestStatus) -> list[Request]:
        """Ends requests wherever they are (waiting, running, preempted) and frees their blocks."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req in self.running:
            self.running.remove(req)
        req.status = status
        req.metrics.finished_time = time.time()
        self.kv_cache.free(req)
        if self._sent_blocks.pop(req.request_id, None) is not None:
            self._finished_ids.add(req.request_id)
        del self.requests[req.request_id]
