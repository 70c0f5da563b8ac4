"""Scheduler unit tests against a model-free worker whose KV cache holds token ids (tests/scheduler_sim.py)."""
from __future__ import annotations

import pytest

from engine.errors import PromptTooLongError
from engine.request import RequestStatus
from tests.scheduler_sim import make_request, make_scheduler, reference_output, run_to_completion, step


def prompts(n: int, length: int, shared: int = 0) -> list[list[int]]:
    base = list(range(500, 500 + shared))
    return [base + [10 + 7 * i + j for j in range(length - shared)] for i in range(n)]


def add_all(sched, ps, max_tokens=8, **kw):
    reqs = []
    for i, p in enumerate(ps):
        r = make_request(f"r{i}", p, max_tokens, arrival=float(i), **kw)
        sched.add_request(r)
        reqs.append(r)
    return reqs


def test_outputs_match_reference_and_blocks_return():
    sched, worker = make_scheduler(num_blocks=32)
    ps = prompts(4, 10)
    add_all(sched, ps)
    outs = run_to_completion(sched, worker)
    for i, p in enumerate(ps):
        assert outs[f"r{i}"] == reference_output(p, 8)
    assert sched.kv_cache.num_free_blocks == 32


def test_token_budget_and_chunked_prefill():
    sched, worker = make_scheduler(num_blocks=64, max_num_batched_tokens=16)
    add_all(sched, prompts(3, 20))
    so = sched.schedule()
    assert so.num_scheduled_tokens == [16] and so.sample == [False]  # a chunk of r0, no sample
    worker.execute(so, sched.requests)
    sched.update_from_output(so, [[]])
    so = sched.schedule()
    assert so.req_ids == ["r0", "r1"] and so.num_scheduled_tokens == [4, 12] and so.sample == [True, False]


def test_no_chunked_prefill_waits_for_budget():
    sched, worker = make_scheduler(num_blocks=64, max_num_batched_tokens=24, chunked=False)
    add_all(sched, prompts(2, 20))
    so = sched.schedule()
    assert so.req_ids == ["r0"] and so.num_scheduled_tokens == [20]


def test_prompt_too_long_rejected_at_add_time():
    sched, _ = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        sched.add_request(make_request("a", list(range(65))))
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        sched.add_request(make_request("b", list(range(17))))  # 5 blocks, the cache has 4
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("c", []))
    assert not sched.has_unfinished_requests()
    sched.add_request(make_request("d", list(range(16))))  # exactly the whole cache is fine
    sched.add_request(make_request("e", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("e", [1, 2]))


def test_whole_cache_prompt_finishes_by_length():
    sched, worker = make_scheduler(num_blocks=4, block_size=4)
    sched.add_request(make_request("d", list(range(16)), max_tokens=5))
    outs = run_to_completion(sched, worker)
    assert len(outs["d"]) == 1  # the cache holds no room for a 17th token


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_and_resume_keep_outputs_exact(mode):
    # 4 requests of 6 + 12 tokens need 5 blocks each = 20; the cache has 10
    sched, worker = make_scheduler(num_blocks=10, num_host_blocks=12 if mode == "swap" else 0, preemption_mode=mode)
    ps = prompts(4, 6)
    add_all(sched, ps, max_tokens=12)
    outs = run_to_completion(sched, worker)
    for i, p in enumerate(ps):
        assert outs[f"r{i}"] == reference_output(p, 12)
    s = sched.stats
    assert s.num_preemptions > 0
    if mode == "swap":
        assert s.num_swap_preemptions == s.num_preemptions and s.num_swap_ins == s.num_preemptions
        assert sched.kv_cache.stats.swapped_out_blocks > 0
    else:
        assert s.num_recompute_preemptions == s.num_preemptions
    assert sched.kv_cache.num_free_blocks == 10 and sched.kv_cache.host_pool.num_free_blocks == sched.kv_cache.num_host_blocks


def test_swap_falls_back_to_recompute_when_host_is_full():
    sched, worker = make_scheduler(num_blocks=10, num_host_blocks=1, preemption_mode="swap")
    ps = prompts(4, 6)
    add_all(sched, ps, max_tokens=12)
    outs = run_to_completion(sched, worker)
    assert outs == {f"r{i}": reference_output(p, 12) for i, p in enumerate(ps)}
    assert sched.stats.num_recompute_preemptions > 0


def test_victim_is_newest_and_oldest_always_progresses():
    sched, worker = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    add_all(sched, prompts(3, 7), max_tokens=20)  # 2 blocks each at start, 7 at the end
    progress = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        so = step(sched, worker)
        if so.preempted_req_ids:
            assert "r0" not in so.preempted_req_ids
        r0 = sched.requests.get("r0")
        progress.append(r0.num_output_tokens if r0 else 20)
    assert not sched.has_unfinished_requests()
    assert sched.stats.num_preemptions > 0
    # r0 (the oldest) gains a token every step until it finishes
    assert progress[:20] == list(range(1, 21))


def test_not_preempted_in_the_step_it_resumed_and_no_admission_after_preemption():
    sched, worker = make_scheduler(num_blocks=8)
    add_all(sched, prompts(4, 7), max_tokens=20)
    resumed_at: dict[str, int] = {}
    for n in range(1, 300):
        if not sched.has_unfinished_requests():
            break
        so = sched.schedule()
        for rid in so.preempted_req_ids:
            assert resumed_at.get(rid) != n, f"{rid} preempted in the step it resumed"
        if so.preempted_req_ids:
            assert not so.new_requests and not any(c.reset_block_ids for c in so.cached_requests if c.req_id in so.preempted_req_ids)
        for r in sched.running:
            if r.resumed_step == sched._step:
                resumed_at[r.request_id] = n
        sched.update_from_output(so, worker.execute(so, sched.requests))
        sched.kv_cache.check_invariants()
    assert not sched.has_unfinished_requests()
    assert sched.stats.num_preemptions > 0


def test_priority_order_and_preemption_by_a_higher_priority_arrival():
    sched, worker = make_scheduler(num_blocks=12, policy="priority")
    low = [make_request(f"low{i}", p, 20, arrival=float(i), priority=5) for i, p in enumerate(prompts(3, 7))]
    for r in low:
        sched.add_request(r)
    for _ in range(3):
        step(sched, worker)
    assert {r.request_id for r in sched.running} == {"low0", "low1", "low2"}
    urgent = make_request("urgent", list(range(900, 912)), 4, arrival=10.0, priority=0)
    sched.add_request(urgent)
    so = step(sched, worker)
    assert "urgent" in so.req_ids
    assert so.preempted_req_ids and all(rid.startswith("low") for rid in so.preempted_req_ids)
    assert sched.stats.num_priority_preemptions == len(so.preempted_req_ids)
    # the newest low-priority request goes first
    assert "low2" in so.preempted_req_ids
    outs = run_to_completion(sched, worker)
    assert outs["urgent"] == reference_output(list(range(900, 912)), 4)
    for i, p in enumerate(prompts(3, 7)):
        assert outs[f"low{i}"] == reference_output(p, 20)


def test_equal_priority_arrival_does_not_preempt():
    sched, worker = make_scheduler(num_blocks=12, policy="priority")
    for i, p in enumerate(prompts(3, 7)):
        sched.add_request(make_request(f"a{i}", p, 20, arrival=float(i), priority=1))
    for _ in range(3):
        step(sched, worker)
    sched.add_request(make_request("late", list(range(900, 912)), 4, arrival=10.0, priority=1))
    so = step(sched, worker)
    assert sched.stats.num_priority_preemptions == 0 and "late" not in so.req_ids


def test_priority_policy_admits_lower_value_first():
    sched, worker = make_scheduler(num_blocks=64, policy="priority", max_num_seqs=1)
    sched.add_request(make_request("b", [1, 2, 3], 2, arrival=0.0, priority=3))
    sched.add_request(make_request("a", [4, 5, 6], 2, arrival=1.0, priority=-1))
    sched.add_request(make_request("c", [7, 8, 9], 2, arrival=2.0, priority=3))
    order = []
    for _ in range(20):
        if not sched.has_unfinished_requests():
            break
        so = step(sched, worker)
        for rid in so.req_ids:
            if rid not in order:
                order.append(rid)
    assert order == ["a", "b", "c"]


@pytest.mark.parametrize("where", ["waiting", "mid_prefill", "decoding", "swapped", "preempted"])
def test_abort_anywhere_frees_everything(where):
    mode = "swap" if where == "swapped" else "recompute"
    sched, worker = make_scheduler(num_blocks=8, num_host_blocks=8, preemption_mode=mode, max_num_batched_tokens=8)
    reqs = add_all(sched, prompts(3, 10), max_tokens=30)
    target = {"waiting": "r2", "mid_prefill": "r0"}.get(where)
    for _ in range(200):
        if where == "waiting":
            break
        if where == "mid_prefill" and 0 < reqs[0].num_computed_tokens < 10:
            break
        if where == "decoding" and reqs[0].num_output_tokens >= 2:
            target = "r0"
            break
        if where in ("swapped", "preempted"):
            pre = [r for r in reqs if r.status == RequestStatus.PREEMPTED and r.num_preemptions]
            if where == "swapped":
                pre = [r for r in pre if sched.kv_cache.is_swapped(r)]
            if pre:
                target = pre[0].request_id
                break
        step(sched, worker)
    assert target is not None, f"never reached state {where}"
    victim = sched.requests[target]
    done = sched.finish_requests(target, RequestStatus.FINISHED_ABORTED)
    assert done == [victim] and victim.status == RequestStatus.FINISHED_ABORTED and victim.block_ids == []
    assert target not in sched.kv_cache.tables and target not in sched.kv_cache.host_tables
    sched.kv_cache.check_invariants()
    for r in list(sched.requests.values()):
        sched.finish_requests(r.request_id, RequestStatus.FINISHED_ABORTED)
    kv = sched.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and kv.host_pool.num_free_blocks == kv.num_host_blocks
    so = sched.schedule()
    assert target in so.finished_req_ids or where == "waiting"
    assert not sched.has_unfinished_requests()


def test_n_samples_share_the_prompt_with_one_prefill():
    sched, worker = make_scheduler(num_blocks=32, max_num_batched_tokens=64)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + a partial one
    reqs = [make_request(f"p#{i}", prompt, 6, parent_id="p", sample_index=i) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()
    assert so.req_ids == ["p#0"] and so.num_scheduled_tokens == [10]  # the siblings wait for it
    sched.update_from_output(so, worker.execute(so, sched.requests))
    so = sched.schedule()
    # siblings recompute only the last prompt token, each copying the shared partial block
    assert sorted(zip(so.req_ids, so.num_scheduled_tokens)) == [("p#0", 1), ("p#1", 1), ("p#2", 1), ("p#3", 1)]
    assert len(so.copy_blocks) == 3
    sched.update_from_output(so, worker.execute(so, sched.requests))
    assert sched.stats.num_forked_samples == 3
    shared = sched.requests["p#0"].block_ids[:2]
    assert all(r.block_ids[:2] == shared for r in reqs)
    assert all(sched.kv_cache.pool.blocks[b].ref_count == 4 for b in shared)
    outs = run_to_completion(sched, worker)
    assert outs == {f"p#{i}": reference_output(prompt, 6, salt=i) for i in range(4)}
    assert len({tuple(o) for o in outs.values()}) == 4  # the samples really diverged
    assert sched.stats.num_prefill_tokens == 10  # the prompt was computed once
    assert sched.kv_cache.num_free_blocks == 32


def test_n_samples_block_aligned_prompt_needs_no_copy():
    sched, worker = make_scheduler(num_blocks=32)
    prompt = list(range(100, 109))  # 9 tokens: the last prompt token starts block 2
    for i in range(3):
        sched.add_request(make_request(f"q#{i}", prompt, 4, parent_id="q", sample_index=i))
    step(sched, worker)
    so = step(sched, worker)
    assert so.copy_blocks == [] and sched.stats.num_forked_samples == 2
    outs = run_to_completion(sched, worker)
    assert outs == {f"q#{i}": reference_output(prompt, 4, salt=i) for i in range(3)}


def test_siblings_fall_back_when_the_first_sample_finishes_early():
    sched, worker = make_scheduler(num_blocks=32, max_num_seqs=1)
    prompt = list(range(100, 110))
    for i in range(3):
        sched.add_request(make_request(f"s#{i}", prompt, 1 if i == 0 else 3, parent_id="s", sample_index=i))
    outs = run_to_completion(sched, worker)
    assert outs["s#0"] == reference_output(prompt, 1)
    assert outs["s#1"] == reference_output(prompt, 3, salt=1) and outs["s#2"] == reference_output(prompt, 3, salt=2)
    assert sched.kv_cache.stats.prefix_hits > 0  # the siblings got the prompt from the prefix cache


def test_prefix_cache_shares_a_system_prompt_across_requests():
    sched, worker = make_scheduler(num_blocks=64, max_num_batched_tokens=256)
    ps = prompts(5, 30, shared=20)
    add_all(sched, ps, max_tokens=4)
    outs = run_to_completion(sched, worker)
    assert outs == {f"r{i}": reference_output(p, 4) for i, p in enumerate(ps)}
    st = sched.kv_cache.get_stats()
    assert st["prefix_cache_queries"] == 5 * 30
    # all 5 are admitted in one step; r1..r4 hit r0's 5 full shared blocks in that same step
    assert st["prefix_cache_hits"] == 4 * 20
    assert sched.stats.num_prefill_tokens == 30 + 4 * 10


def test_stats_track_batch_composition():
    sched, worker = make_scheduler(num_blocks=64)
    add_all(sched, prompts(2, 5), max_tokens=3)
    step(sched, worker)
    assert (sched.stats.last_num_prefills, sched.stats.last_num_decodes, sched.stats.last_num_scheduled_tokens) == (2, 0, 10)
    step(sched, worker)
    assert (sched.stats.last_num_prefills, sched.stats.last_num_decodes) == (0, 2)
    assert sched.stats.last_num_running == 2


def test_throughput_degrades_gracefully_near_a_full_cache():
    """Random workload at a quarter of the blocks it would need: preemptions stay rare and the
    recompute overhead small (prefix hits bring a preempted request's blocks back)."""
    import random

    rng = random.Random(0)
    wl = [([rng.randrange(3, 900) for _ in range(rng.randint(16, 96))], rng.randint(16, 96)) for _ in range(32)]
    needed = sum(-(-(len(p) + m) // 16) for p, m in wl)
    sched, worker = make_scheduler(needed // 4, 16, max_num_batched_tokens=512, max_num_seqs=256, max_model_len=4096)
    for i, (p, m) in enumerate(wl):
        sched.add_request(make_request(f"r{i}", p, m, arrival=float(i)))
    outs = run_to_completion(sched, worker)
    assert all(outs[f"r{i}"] == reference_output(p, m) for i, (p, m) in enumerate(wl))
    computed = sched.stats.num_prefill_tokens + sched.stats.num_decode_tokens
    useful = sum(len(p) + m - 1 for p, m in wl)
    assert computed <= 1.4 * useful, computed / useful
    assert sched.stats.num_preemptions <= len(wl)


def test_engine_rejects_impossible_prompts_at_add_time_and_keeps_serving(tiny_model_path):
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(tiny_model_path), block_size=16, num_gpu_blocks_override=4, max_model_len=128)
    engine = llm.llm_engine
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        engine.add_request("long", list(range(100, 229)))  # 129 tokens > max_model_len
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        llm.generate({"prompt_token_ids": list(range(100, 165))}, use_tqdm=False)  # 65 tokens = 5 blocks > 4
    assert not engine.has_unfinished_requests() and engine.output_processor.parents == {}
    out = llm.generate({"prompt_token_ids": list(range(100, 164))}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1  # the whole cache holds the prompt: room for one token
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert llm.get_stats()["kv_blocks_used"] == 0
    llm.shutdown()


def test_a_host_block_read_by_a_swap_in_is_not_reused_by_a_swap_out_of_the_same_step():
    """Found by the property test: q0#0 swapped out into the only host block, swapped back in the
    next step while q1 was preempted by swap in that same step. The worker runs every swap-out
    before any swap-in, so q1 must not get the host block q0#0 is still to be read from."""
    from tests.scheduler_sim import make_request, make_scheduler, step

    sched, worker = make_scheduler(4, 4, caching=False, num_host_blocks=1, preemption_mode="swap",
                                   policy="priority", max_num_batched_tokens=48, max_num_seqs=3, max_model_len=48,
                                   chunked=False)
    for i in range(2):
        sched.add_request(make_request(f"q0#{i}", [3], 3, arrival=1.0, parent_id="q0", sample_index=i))
    step(sched, worker)
    sched.add_request(make_request("q1", [3], 2, arrival=2.0, priority=1, parent_id="q1"))
    step(sched, worker)
    assert sched.preempt_request("q0#0")
    sched.add_request(make_request("q2", [3], 1, arrival=3.0, parent_id="q2"))
    so = step(sched, worker)  # the sim worker raises if any request reads tokens that are not its own
    host_targets = [h for _, h in so.swap_out]
    assert len(set(host_targets)) == len(host_targets), so.swap_out  # no host block written twice
    sched.kv_cache.check_invariants()
