"""Property-based tests: random add / step / finish / abort / preempt sequences against the scheduler
and KV cache manager, with a model-free worker that checks every read through the block tables."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.request import RequestStatus
from tests.scheduler_sim import make_request, make_scheduler, reference_output, step

PREFIXES = [[], [7, 7, 7, 7, 7, 7, 7, 7], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 16),
        block_size=st.sampled_from([2, 4]),
        caching=st.booleans(),
        mode=st.sampled_from(["recompute", "swap"]),
        num_host_blocks=st.integers(0, 12),
        policy=st.sampled_from(["fcfs", "priority"]),
        budget=st.integers(4, 24),
        chunked=st.booleans(),
        max_num_seqs=st.integers(1, 6),
    )
    def setup(self, num_blocks, block_size, caching, mode, num_host_blocks, policy, budget, chunked, max_num_seqs):
        self.max_model_len = 48
        self.sched, self.worker = make_scheduler(
            num_blocks,
            block_size,
            caching=caching,
            num_host_blocks=num_host_blocks if mode == "swap" else 0,
            preemption_mode=mode,
            policy=policy,
            max_num_batched_tokens=budget if chunked else self.max_model_len,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
            chunked=chunked,
        )
        self.count = 0
        self.all_requests = []

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(3, 50), min_size=0, max_size=10),
        max_tokens=st.integers(1, 12),
        n=st.integers(1, 3),
        priority=st.integers(0, 2),
    )
    def add(self, prefix, tail, max_tokens, n, priority):
        prompt = (prefix + tail)[:40] or [3]
        if self.sched.kv_cache.blocks_needed(len(prompt)) > self.sched.kv_cache.num_blocks:
            return  # rejected at add time (tested elsewhere)
        pid = f"q{self.count}"
        self.count += 1
        for i in range(n):
            rid = pid if n == 1 else f"{pid}#{i}"
            req = make_request(rid, prompt, max_tokens, arrival=float(self.count), priority=priority,
                               parent_id=pid, sample_index=i)
            self.sched.add_request(req)
            self.all_requests.append(req)

    @rule(times=st.integers(1, 4))
    def do_step(self, times):
        for _ in range(times):
            step(self.sched, self.worker)

    def _pick(self, data, statuses):
        live = [r for r in self.sched.requests.values() if r.status in statuses]
        return data.draw(st.sampled_from(live)) if live else None

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
    def finish(self, data, status):
        req = self._pick(data, (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED))
        if req is not None:
            assert self.sched.finish_requests(req.request_id, status) == [req]
            assert req.block_ids == [] and not self.sched.kv_cache.is_swapped(req)

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def preempt(self, data):
        req = self._pick(data, (RequestStatus.RUNNING,))
        assert self.sched.preempt_request(req.request_id)
        assert req.status == RequestStatus.PREEMPTED

    @invariant()
    def accounting_holds(self):
        kv = self.sched.kv_cache
        kv.check_invariants()
        # every registered block really holds its tokens (in the worker's token-id "KV cache")
        for block in kv.pool.blocks:
            if block.block_hash is not None and block.ref_count > 0:
                assert tuple(self.worker.kv[block.block_id]) == block.token_ids
        # tables belong to live requests only; swapped ones hold no device blocks
        assert set(kv.tables) <= set(self.sched.requests)
        assert set(kv.host_tables) <= set(self.sched.requests)
        assert not set(kv.tables) & set(kv.host_tables)
        for r in self.sched.running:
            assert r.request_id in kv.tables
        assert len(self.sched.running) <= self.sched.config.max_num_seqs

    def teardown(self):
        sched = getattr(self, "sched", None)
        if sched is None:
            return
        # let everything left run out (bounded), then check outputs and that every block is free
        for _ in range(2000):
            if not sched.has_unfinished_requests():
                break
            step(sched, self.worker)
            sched.kv_cache.check_invariants()
        assert not sched.has_unfinished_requests(), "requests starved"
        kv = sched.kv_cache
        assert kv.num_free_blocks == kv.num_blocks
        assert kv.host_pool.num_free_blocks == kv.num_host_blocks
        for r in self.all_requests:
            # aborted or stopped ones end early, but what every request produced is exact
            assert r.output_token_ids == reference_output(r.prompt_token_ids, r.num_output_tokens, r.sample_index)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSchedulerProperties = SchedulerMachine.TestCase
