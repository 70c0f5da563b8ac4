"""The adapter-slot rule and per-adapter prefix caching, model-free: random request streams over a
few adapters (tests/scheduler_sim.py's worker checks every read through the block tables), plus
the grouped shrink/expand op against its row-by-row definition."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.block_manager.hashing import block_hashes, root_hash
from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.config import SchedulerConfig
from engine.lora import LoRARequest
from engine.lora.ops import LoRABatch, add_lora, lora_reference
from engine.request import RequestStatus
from engine.scheduler.scheduler import Scheduler
from tests.scheduler_sim import SimWorker, make_request, reference_output, step

PROMPTS = [[7] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 5, 6, 6, 7, 7, 8, 8]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_loras=st.integers(1, 3),
    num_blocks=st.integers(8, 24),
    budget=st.integers(4, 24),
    reqs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2), st.integers(1, 8), st.integers(0, 3)),
                  min_size=1, max_size=14),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_steps_never_hold_more_adapters_than_slots_and_never_stall(max_loras, num_blocks, budget, reqs, policy):
    bs = 4
    kv = KVCacheManager(num_blocks, bs, True, 0)
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget, max_model_len=40, policy=policy,
                          max_loras=max_loras)
    sched, worker = Scheduler(cfg, kv), SimWorker(num_blocks, bs)
    all_reqs = []
    for i, (adapter, prompt, max_tokens, priority) in enumerate(reqs):
        r = make_request(f"r{i}", PROMPTS[prompt], max_tokens, arrival=float(i), priority=priority)
        r.lora_request = LoRARequest(f"a{adapter}", adapter, "/x") if adapter else None
        sched.add_request(r)
        all_reqs.append(r)
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        so = step(sched, worker)
        kv.check_invariants()
        step_adapters = {all_by_id(all_reqs)[rid].lora_int_id for rid in so.req_ids} - {None}
        assert len(step_adapters) <= max_loras, step_adapters
        running = {r.lora_int_id for r in sched.running} - {None}
        assert len(running) <= max_loras
        # two adapters (or an adapter and the base model) never share a KV block
        owner: dict[int, int | None] = {}
        for r in sched.running:
            for b in r.block_ids:
                assert owner.setdefault(b, r.lora_int_id) == r.lora_int_id, (b, owner[b], r.lora_int_id)
    else:
        raise AssertionError("the scheduler stalled")
    for r in all_reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens)
    assert kv.num_free_blocks == num_blocks


def all_by_id(reqs):
    return {r.request_id: r for r in reqs}


def test_adapter_salts_the_prefix_hashes():
    toks = list(range(16))
    base, one, two = (block_hashes(toks, 4, root=root_hash(s)) for s in (None, 1, 2))
    assert base == block_hashes(toks, 4)  # the base model's hashes are unchanged
    assert not set(base) & set(one) and not set(one) & set(two)


def test_grouped_shrink_expand_equals_row_by_row():
    gen = torch.Generator().manual_seed(0)
    slots, n_r, d_in, d_out, rows = 3, 12, 20, 28, 9
    a = torch.randn(slots, n_r, d_in, generator=gen)
    b = torch.randn(slots, d_out, n_r, generator=gen)
    x = torch.randn(rows, d_in, generator=gen)
    cases = ([0, -1, 2, 0, 1, -1, 2, 2, 0], [1] * rows, [2, 2, 0, 0, 0, 1, 1, 1, 2], [-1] * 8 + [1],
             [2, -1, 0, 0, 2, 2, 2, -1, 0])  # (slots 0 and 2: not consecutive)
    for slot_of_row in cases:
        batch = LoRABatch.build(slot_of_row, torch.device("cpu"))
        base = torch.randn(rows, d_out, generator=gen)
        out = add_lora(base.clone(), x, a, b, batch)
        assert torch.allclose(out, base + lora_reference(x, a, b, slot_of_row), atol=1e-5), slot_of_row
    assert LoRABatch.build([-1, -1], torch.device("cpu")) is None
    assert LoRABatch.build([1] * rows, torch.device("cpu")).perm is None  # one adapter on every row: no gathers
