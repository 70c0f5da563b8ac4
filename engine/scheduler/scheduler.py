"""Iteration-level continuous batching under a token budget, with preemption and n > 1 sharing.

See docs/scheduling.md for the policies and the rules this scheduler keeps.
"""
from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING

from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.errors import PromptTooLongError
from engine.lora.admission import AdapterSlots
from engine.request import NO_TOKEN, NO_TOKEN_REASON, Request, RequestStatus
from engine.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from engine.scheduler.policy import make_policy
from engine.scheduler.retained_kv import RetainedKV
from engine.scheduler.stats import SchedulerStats  # re-exported: its home was this module
from engine.scheduler.step_state import Admission, AdmissionKind, StepState
from engine.spec_decode.stats import SpecDecodingStats

if TYPE_CHECKING:  # annotations only: engine.config imports engine.scheduler.policy (its registry)
    from engine.config import SchedulerConfig
    from engine.structured_output.manager import StructuredOutputManager

WATERMARK_FRACTION = 0.01  # vLLM's watermark: admissions leave 1% of the blocks free for growth


class Scheduler:
    """Each step assigns every runnable request a number of tokens to compute.

    fcfs: running requests are served first, oldest first, then waiting ones in arrival order.
    priority: running and waiting requests are served in one (priority, arrival) order, so a
    waiting request can preempt running ones of strictly lower priority. When blocks run out, the
    last request in policy order that is not yet scheduled this step is preempted (by recompute, or
    by swap when configured and host blocks are free); the first request in policy order can always
    proceed, so the engine never stalls.
    """

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 structured_output: StructuredOutputManager | None = None) -> None:
        self.config = config
        self.structured_output = structured_output  # grammars: compiles, matchers, step bitmasks
        self.rejected: list[Request] = []  # ended without running (a grammar that failed); the engine takes them
        self.kv_cache = kv_cache
        self.policy = make_policy(config.policy)
        self.block_size = kv_cache.block_size
        # a sequence can never grow past what the whole cache holds
        self.max_model_len = min(config.max_model_len, kv_cache.num_blocks * self.block_size)
        self.watermark_blocks = max(int(kv_cache.num_blocks * WATERMARK_FRACTION), 1)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self.spec_stats = SpecDecodingStats()  # speculative decoding: acceptance counts
        self._step = 0
        self._sent_blocks: dict[str, int] = {}  # req id -> blocks of its table the workers know
        self._reset_tables: set[str] = set()  # known to workers, but their table must be resent whole
        self._finished_ids: set[str] = set()
        self.retained = RetainedKV()  # finished beams' blocks, kept for their continuations to fork
        self._group_leader: dict[str, str] = {}  # n > 1: parent id -> the sample that prefills
        self.num_lookahead_tokens = config.num_lookahead_slots  # slots a draft model writes past a step
        self.adapter_slots = AdapterSlots(config.max_loras)  # LoRA: distinct adapters per step <= slots

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
        needed = self.kv_cache.blocks_needed(num_prompt_tokens)
        if needed > self.kv_cache.num_blocks:
            raise PromptTooLongError(
                f"the prompt needs {needed} KV blocks but the cache has only {self.kv_cache.num_blocks}; "
                "shorten it or give the KV cache more memory (kv_cache_memory_bytes / num_gpu_blocks_override)"
            )

    def add_request(self, request: Request) -> None:
        self.check_prompt(request.num_prompt_tokens)
        if request.request_id in self.requests or request.request_id in self.retained.entries:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params
        if params.max_tokens is None:  # generation then ends at max_model_len
            params.max_tokens = max(self.max_model_len - request.num_prompt_tokens, 1)
        pid = request.parent_id
        if pid is not None and pid != request.request_id:  # one sample of an n > 1 request
            leader_id = self._group_leader.setdefault(pid, request.request_id)
            leader = self.requests.get(leader_id)
            if leader is not None and leader.prompt_token_ids == request.prompt_token_ids:
                request.fork_from = leader_id
        if params.structured_outputs is not None:  # WAITING_FOR_FSM until its grammar is compiled
            self.structured_output.add_request(request)
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

    @property
    def num_swapped(self) -> int:
        return len(self.kv_cache.host_tables)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._step += 1
        st = StepState(budget=self.config.max_num_batched_tokens)
        order = self.policy.step_order(self.running, self.waiting)
        admitting = True
        for req in order:
            if st.budget <= 0:
                break
            if req.status == RequestStatus.RUNNING:
                self._schedule_running(req, st)
            elif req.status == RequestStatus.PREEMPTED and req in st.preempted:
                continue  # preempted earlier in this step: it waits at least one step
            elif req.status == RequestStatus.WAITING_FOR_FSM and not self._grammar_ready(req):
                continue  # its grammar is compiling (or failed to): the requests behind it go ahead
            elif admitting and not self._waits_for_sibling(req):
                # no admissions into a cache that just overflowed (no thrashing), and in policy
                # order nothing jumps past a blocked request; running ones behind it still run
                admitting = (not st.growth_preempted and self.adapter_slots.admits(req, self.running, st.admitted)
                             and self._has_seq_slot(req, st))
                admitting = admitting and self._schedule_waiting(req, st)
        for req in st.admitted:
            self.waiting.remove(req)
            self._insert_running(req)
        return self._make_output(st)

    def _grammar_ready(self, req: Request) -> bool:
        error = self.structured_output.poll(req)  # None: ready (now WAITING); "": compiling; else why not
        if error:  # the request ends with "error", its reason in stop_reason
            self._finish(req, RequestStatus.FINISHED_ERROR)
            req.stop_reason = error
            self.rejected.append(req)
        return error is None

    def _waits_for_sibling(self, req: Request) -> bool:
        """n > 1: the sample's first sibling is still computing the prompt they will share."""
        if req.fork_from is None:
            return False
        leader = self.requests.get(req.fork_from)
        return (
            leader is not None
            and leader.status == RequestStatus.RUNNING
            # (a sibling resumed in this step may hold blocks a swap-in fills only now)
            and (leader.num_computed_tokens < req.num_prompt_tokens or leader.resumed_step == self._step)
        )

    def _has_seq_slot(self, req: Request, st: StepState) -> bool:
        """Whether max_num_seqs leaves room for ``req``; it may take the slot of a running request
        the policy lets it displace."""
        while len(self.running) + len(st.admitted) >= self.config.max_num_seqs:
            victim = self._pick_victim(st, displaced_by=req)
            if victim is None:
                return False
            self._preempt(victim, st)
            self.stats.num_priority_preemptions += 1
        return True

    def _schedule_running(self, req: Request, st: StepState) -> None:
        num_new = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, st.budget)
        num_new = min(num_new, self.max_model_len - req.num_computed_tokens)
        if num_new <= 0:
            return
        # a draft model proposes into up to num_lookahead_tokens slots after this step's tokens;
        # best effort: nothing is preempted for them
        lookahead = max(min(self.num_lookahead_tokens, self.max_model_len - req.num_computed_tokens - num_new), 0)
        while not (
            self.kv_cache.allocate_slots(req, num_new, num_lookahead_tokens=lookahead)
            or (lookahead and self.kv_cache.allocate_slots(req, num_new))
        ):
            if self._free_retained(everything=True):  # kept blocks are a cache: they go before anyone is preempted
                continue
            victim = self._pick_victim(st)  # never None: req itself qualifies
            self._preempt(victim, st)
            st.growth_preempted = True
            if victim is req:
                return
        self._add_to_batch(st, req, num_new)

    def _pick_victim(self, st: StepState, displaced_by: Request | None = None) -> Request | None:
        """The last running request in policy order that this step has not scheduled or resumed
        (with ``displaced_by``: only one the policy lets that request displace)."""
        for r in reversed(self.running):
            if r.request_id in st.scheduled or r.resumed_step == self._step:
                continue
            if displaced_by is not None and not self.policy.may_displace(displaced_by, r):
                return None  # running is in policy order: nothing before it qualifies either
            return r
        return None

    def _plan_admission(self, req: Request, budget: int) -> Admission | None | bool:
        """How ``req`` would start this step; None when it must wait for a sibling's prefill,
        False when its first chunk exceeds the budget without chunked prefill."""
        kv = self.kv_cache
        if kv.is_swapped(req):
            num_new = req.num_tokens - req.num_computed_tokens
            if not self.config.enable_chunked_prefill and num_new > budget:
                return False
            num_new = min(num_new, budget)
            table_len = len(kv.host_tables[req.request_id])
            grow = max(kv.blocks_needed(req.num_computed_tokens + num_new) - table_len, 0)
            return Admission(AdmissionKind.SWAP_IN, num_new, kv.swap_in_blocks_needed(req) + grow)
        if req.fork_from is not None:
            if self._waits_for_sibling(req):
                return None
            leader = self.requests.get(req.fork_from)
            if leader is not None and leader.status == RequestStatus.RUNNING:
                return Admission(AdmissionKind.FORK, 1, 1, source=leader, num_shared=req.num_prompt_tokens - 1)
            req.fork_from = None  # the sibling is gone or preempted: take the ordinary path
        source = self.retained.source_for(req)
        if source is not None:  # beam search: continue a finished beam's blocks
            shared = source.num_computed_tokens
            num_new = req.num_tokens - shared
            if not self.config.enable_chunked_prefill and num_new > budget:
                return False
            num_new = min(num_new, budget)
            # the new blocks, plus a copy of the shared partial last block
            need = kv.blocks_needed(shared + num_new) - kv.blocks_needed(shared) + 1
            return Admission(AdmissionKind.FORK, num_new, need, source=source, num_shared=shared)
        reads_cache = req.num_computed_tokens == 0 and not req.skip_reading_prefix_cache
        computed = kv.get_computed_blocks(req) if reads_cache else []
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        num_new = req.num_tokens - num_computed
        if not self.config.enable_chunked_prefill and num_new > budget:
            return False
        num_new = min(num_new, budget)
        return Admission(AdmissionKind.NEW, num_new, kv.blocks_to_allocate(req, num_new, computed), computed)

    def _schedule_waiting(self, req: Request, st: StepState) -> bool:
        """Admits ``req`` if it fits; returns False when it is blocked (and nothing should pass it)."""
        kv = self.kv_cache
        reserve = self.watermark_blocks if (self.running or st.admitted) else 0
        while True:
            plan = self._plan_admission(req, st.budget)
            if plan is None:
                return True  # not ready; later requests may go ahead
            if plan is False:
                return False
            if plan.need + reserve <= kv.num_free_blocks:
                break
            if self._free_retained(everything=True):
                continue
            victim = self._pick_victim(st, displaced_by=req)
            if victim is None:
                return False
            self._preempt(victim, st)
            self.stats.num_priority_preemptions += 1
            reserve = self.watermark_blocks if (self.running or st.admitted) else 0
        first_time = req.status == RequestStatus.WAITING
        if plan.kind is AdmissionKind.SWAP_IN:
            kv.swap_in(req)
            self.stats.num_swap_ins += 1
            ok = kv.allocate_slots(req, plan.num_new)
        elif plan.kind is AdmissionKind.FORK:
            kv.fork(plan.source, req, plan.num_shared)
            req.num_computed_tokens = plan.num_shared
            if req.kv_source is None:
                self.stats.num_forked_samples += 1
            else:
                self.stats.num_forked_beams += 1
            ok = kv.allocate_slots(req, plan.num_new)
        else:
            ok = kv.allocate_slots(req, plan.num_new, plan.computed)
            req.num_computed_tokens += len(plan.computed) * self.block_size
            if first_time:
                req.num_cached_tokens = req.num_computed_tokens
                kv.record_prefix_query(req.num_prompt_tokens, req.num_computed_tokens)
        if not ok:  # plan.need was checked against the free blocks just above
            raise RuntimeError(f"block accounting error admitting {req.request_id}")
        req.fork_from = None
        if first_time:
            req.metrics.first_scheduled_time = time.time()
        req.status = RequestStatus.RUNNING
        req.resumed_step = self._step
        st.admitted.append(req)
        self._add_to_batch(st, req, plan.num_new)
        return True

    def _add_to_batch(self, st: StepState, req: Request, num_new: int) -> None:
        is_decode = num_new == 1 and req.num_computed_tokens + 1 == req.num_tokens and req.pooling_params is None
        (st.decodes if is_decode else st.prefills).append((req, num_new))
        st.scheduled.add(req.request_id)
        st.budget -= num_new

    def _preempt(self, req: Request, st: StepState) -> None:
        """Frees a running request's device blocks: swapped to host when configured and room is
        left there, else dropped (its tokens are recomputed, mostly from the prefix cache)."""
        self.running.remove(req)
        if self.config.preempts_by_swap and self.kv_cache.can_swap_out(req):
            self.kv_cache.swap_out(req)
            self.stats.num_swap_preemptions += 1
        else:
            self.kv_cache.free(req)
            req.num_computed_tokens = 0
            self.stats.num_recompute_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        req.spec_token_ids = []
        req.num_preemptions += 1
        req.metrics.num_preemptions += 1
        self.stats.num_preemptions += 1
        if req.request_id in self._sent_blocks:
            self._reset_tables.add(req.request_id)
        st.preempted.append(req)
        self._insert_waiting(req)

    def preempt_request(self, request_id: str) -> bool:
        """Preempts a running request between steps (as memory pressure would), in the configured
        mode. For operators and tests; returns False when it is not running."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.RUNNING:
            return False
        self._preempt(req, StepState(budget=0))
        return True

    def release_kv(self, request_ids: list[str]) -> None:
        """The caller has queued every continuation of these finished, retained requests: their
        blocks go back once no waiting request still names them as its source (between steps)."""
        self.retained.release(request_ids)
        self._free_retained()

    def _free_retained(self, everything: bool = False) -> bool:
        """Frees the retained requests that are due (all of them with ``everything``: the cache
        needs the room); returns whether any block table was freed."""
        if not self.retained:
            return False
        wanted = set() if everything else {r.kv_source for r in self.waiting if r.kv_source is not None}
        due = self.retained.take_due(self._step, wanted, everything)
        for req in due:
            self.kv_cache.free(req)
        return bool(due)

    def _make_output(self, st: StepState) -> SchedulerOutput:
        ops = self.kv_cache.take_block_ops()
        out = SchedulerOutput(
            finished_req_ids=self._finished_ids,
            preempted_req_ids={r.request_id for r in st.preempted},
            swap_out=ops.swap_out,
            swap_in=ops.swap_in,
            copy_blocks=ops.copy,
        )
        self._finished_ids = set()
        self._reset_tables |= self.kv_cache.take_rewritten()
        for req, num_new in st.decodes + st.prefills:
            rid = req.request_id
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start : start + num_new]
            spec = []
            if len(tokens) < num_new:  # the rest are speculative proposals
                spec = req.spec_token_ids[: num_new - len(tokens)]
                out.spec_token_ids[rid] = spec
            out.req_ids.append(rid)
            out.num_scheduled_tokens.append(num_new)
            out.num_computed_tokens.append(start)
            out.token_ids.append(tokens + spec)
            out.sample.append(start + num_new >= req.num_tokens and req.pooling_params is None)  # pooling: none
            if self.num_lookahead_tokens:
                out.lookahead_slots[rid] = self._lookahead_slots(req, start + num_new)
            sent = self._sent_blocks.get(rid)
            if sent is None:
                self._reset_tables.discard(rid)
                out.new_requests.append(
                    NewRequestData(
                        rid, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params, list(req.block_ids),
                        req.pooling_params, lora_request=req.lora_request,
                    )
                )
            elif rid in self._reset_tables:
                out.cached_requests.append(CachedRequestData(rid, list(req.block_ids), reset_block_ids=True))
                self._reset_tables.discard(rid)
            else:
                out.cached_requests.append(CachedRequestData(rid, req.block_ids[sent:]))
            self._sent_blocks[rid] = len(req.block_ids)
        if self.structured_output is not None:  # (and, when nothing runs, waits briefly for compiles)
            self.structured_output.fill_bitmask(out, self.requests)
        s = self.stats
        s.num_steps += 1
        s.last_num_decodes = len(st.decodes)
        s.last_num_prefills = len(st.prefills)
        s.last_num_scheduled_tokens = out.total_num_scheduled_tokens
        s.last_num_preempted = len(st.preempted)
        s.last_num_running = len(self.running)
        s.last_num_waiting = len(self.waiting)
        s.last_num_swapped = self.num_swapped
        s.num_decode_tokens += len(st.decodes)
        s.num_prefill_tokens += out.total_num_scheduled_tokens - len(st.decodes)
        return out

    def _lookahead_slots(self, req: Request, end: int) -> int:
        """How many KV slots from position ``end`` on a draft model may write: the run of slots in
        blocks ``req`` holds alone (up to num_lookahead_tokens). A shared block's K/V belongs to
        every request that reads it."""
        blocks, bs = req.kv_blocks, self.block_size
        slots, b = 0, end // bs
        while b < len(blocks) and blocks[b].ref_count == 1 and slots < self.num_lookahead_tokens:
            slots += (b + 1) * bs - max(end, b * bs)
            b += 1
        return min(slots, self.num_lookahead_tokens)

    # ---- results ---------------------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: list[list[int]], draft_token_ids: dict[str, list[int]] | None = None,
    ) -> list[tuple[Request, list[int]]]:
        """Advances each scheduled request by its computed tokens and appends sampled tokens.

        ``sampled[i]`` holds the tokens accepted for ``out.req_ids[i]`` (empty when nothing was
        sampled); ``draft_token_ids`` the proposals the worker made for the next step, which a
        request that goes on keeps in ``spec_token_ids`` for the next schedule() to budget.
        Returns each request that received tokens with the tokens it kept (none past a stop);
        finished ones have already released their blocks.
        """
        updated = []
        now = time.time()
        drafts = draft_token_ids or {}
        for i, req_id in enumerate(out.req_ids):
            num_spec = len(out.spec_token_ids.get(req_id, ()))
            if num_spec and out.sample[i] and sampled[i]:
                self.spec_stats.observe(num_spec, len(sampled[i]) - 1)
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = sampled[i] if out.sample[i] else []
            # rejected proposals are not computed: their slots are rewritten next step
            num_rejected = max(num_spec - (len(tokens) - 1), 0) if tokens else 0
            req.num_computed_tokens += out.num_scheduled_tokens[i] - num_rejected
            req.spec_token_ids = []
            if req.pooling_params is not None and req.num_computed_tokens >= req.num_prompt_tokens:
                self._finish(req, RequestStatus.FINISHED_STOPPED)  # pooled: the worker returned its vector
                updated.append((req, []))
            if not tokens:
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            kept = []
            for tok in tokens:
                if tok == NO_TOKEN:  # every token was masked: fail the request rather than emit token 0
                    req.stop_reason = NO_TOKEN_REASON
                    self._finish(req, RequestStatus.FINISHED_ERROR)
                    break
                req.append_output_token(tok)
                kept.append(tok)
                status = self._check_stop(req, tok)
                if status is not None:
                    self._finish(req, status)
                    break
            if not req.is_finished:  # proposals past what the grammar allows are cut off
                req.spec_token_ids = drafts.get(req_id, [])
                if req.structured_output_request is not None:
                    req.spec_token_ids = self.structured_output.validate_drafts(req, req.spec_token_ids)
            updated.append((req, kept))
        self._free_retained()  # the step that forked them has run: released sources can go
        return updated

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.structured_output_request is not None:  # a grammar that ended (or rejected the token)
            verdict = self.structured_output.advance(req, token)
            if verdict is not None:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED if verdict == "stop" else RequestStatus.FINISHED_ERROR
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
        """Ends requests wherever they are (waiting, running, preempted or swapped out) and frees
        every block they hold."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        req.metrics.finished_time = time.time()
        rid = req.request_id
        if req.retain_kv and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.retained.keep(req, self._step)  # its continuations fork these blocks (retained_kv.py)
        else:
            self.kv_cache.free(req)
        self._reset_tables.discard(rid)
        if self._sent_blocks.pop(rid, None) is not None:
            self._finished_ids.add(rid)
        if req.parent_id is not None and self._group_leader.get(req.parent_id) == rid:
            del self._group_leader[req.parent_id]
        del self.requests[rid]
