"""Finished requests that keep their blocks for the requests continuing them (beam search's forks,
engine/scheduler/retained_kv.py), against the model-free worker that checks every read."""
from __future__ import annotations

import pytest

from engine.scheduler.retained_kv import RETAINED_KV_MAX_STEPS
from tests.scheduler_sim import make_request, make_scheduler, reference_output, run_to_completion, step


def beam(rid, prompt, max_tokens=1, source=None):
    r = make_request(rid, prompt, max_tokens)
    r.retain_kv, r.kv_source = True, source
    return r


def finish_parent(sched, worker, prompt):
    parent = beam("a", prompt)
    sched.add_request(parent)
    step(sched, worker)
    assert parent.is_finished and len(parent.output_token_ids) == 1
    return parent


def test_continuations_fork_a_finished_request_and_compute_one_token():
    sched, worker = make_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks and a partial one
    parent = finish_parent(sched, worker, prompt)
    assert sched.kv_cache.num_free_blocks == 32 - 3  # kept after it finished
    grown = prompt + parent.output_token_ids
    kids = [beam(f"b{i}", grown, max_tokens=5, source="a") for i in range(2)]
    for k in kids:
        sched.add_request(k)
    sched.release_kv(["a"])  # released, but queued continuations still name it: it stays
    assert sched.kv_cache.num_free_blocks == 32 - 3
    so = sched.schedule()
    assert sorted(zip(so.req_ids, so.num_scheduled_tokens)) == [("b0", 1), ("b1", 1)]
    assert len(so.copy_blocks) == 2  # each copies the shared partial block before writing into it
    assert sched.stats.num_forked_beams == 2
    full = parent.block_ids[:2]
    assert kids[0].block_ids[:2] == kids[1].block_ids[:2] == full
    assert all(sched.kv_cache.pool.blocks[b].ref_count == 3 for b in full)
    sched.update_from_output(so, worker.execute(so, sched.requests))
    assert not sched.retained  # the step that forked it ran: the released parent is gone
    outs = run_to_completion(sched, worker)
    # kept with retain_kv, the children hold their blocks until released too
    assert sched.kv_cache.num_free_blocks < 32
    sched.release_kv(["b0", "b1"])
    assert outs == {f"b{i}": reference_output(grown, 5) for i in range(2)}
    assert sched.stats.num_prefill_tokens == 10  # the prompt was computed once
    assert sched.kv_cache.num_free_blocks == 32
    sched.kv_cache.check_invariants()


def test_a_pruned_parent_is_freed_at_release():
    sched, worker = make_scheduler(num_blocks=32, block_size=4)
    finish_parent(sched, worker, list(range(100, 110)))
    sched.release_kv(["a"])  # no continuation: freed at once
    assert sched.kv_cache.num_free_blocks == 32 and not sched.retained


def test_kept_blocks_go_before_anyone_is_preempted():
    sched, worker = make_scheduler(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))
    parent = finish_parent(sched, worker, prompt)
    big = make_request("big", list(range(300, 328)), 2)  # 28 tokens + 2: all 8 blocks
    sched.add_request(big)
    step(sched, worker)
    assert not sched.retained and sched.stats.num_preemptions == 0
    # the continuation then starts the ordinary way and still reads exactly its tokens
    grown = prompt + parent.output_token_ids
    sched.add_request(beam("b", grown, max_tokens=3, source="a"))
    outs = run_to_completion(sched, worker)
    assert outs["b"] == reference_output(grown, 3) and sched.stats.num_forked_beams == 0
    sched.release_kv(["b"])
    assert sched.kv_cache.num_free_blocks == 8


def test_unreleased_blocks_expire():
    sched, worker = make_scheduler(num_blocks=32, block_size=4)
    finish_parent(sched, worker, list(range(100, 110)))
    sched.add_request(make_request("long", list(range(200, 204)), RETAINED_KV_MAX_STEPS + 2))
    for _ in range(RETAINED_KV_MAX_STEPS - 1):
        step(sched, worker)
    assert sched.retained
    run_to_completion(sched, worker)
    assert not sched.retained and sched.kv_cache.num_free_blocks == 32


def test_a_continuation_that_does_not_extend_its_source_starts_the_ordinary_way():
    sched, worker = make_scheduler(num_blocks=32, block_size=4)
    finish_parent(sched, worker, list(range(100, 110)))
    other = list(range(100, 109)) + [7, 8]  # differs from the source at token 9
    sched.add_request(beam("b", other, max_tokens=2, source="a"))
    outs = run_to_completion(sched, worker)
    assert outs["b"] == reference_output(other, 2) and sched.stats.num_forked_beams == 0
    sched.release_kv(["a", "b"])
    assert sched.kv_cache.num_free_blocks == 32


def test_a_kept_request_id_is_still_in_use():
    sched, worker = make_scheduler(num_blocks=32, block_size=4)
    finish_parent(sched, worker, list(range(100, 110)))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", [1, 2, 3]))
    sched.release_kv(["a"])
    sched.add_request(make_request("a", [1, 2, 3]))
