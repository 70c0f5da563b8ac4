"""A pipeline step cut into micro-batches (engine/pipeline/micro_batch.py) computes what the whole
step would: run group by group against the model-free worker, which checks every request's reads
through its block table, under prefix hits within a step, n > 1 forks, copy-on-write and swap."""
from __future__ import annotations

import pytest
import torch

from engine.pipeline.micro_batch import _bounds, merge_outputs, split_step
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput
from tests.scheduler_sim import make_request, make_scheduler, reference_output


def run_split(sched, worker, groups: int, max_steps: int = 2000) -> dict[str, list[int]]:
    reqs = dict(sched.requests)
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        so = sched.schedule()
        outs = []
        for g in split_step(so, groups):
            sampled = worker.execute(g, sched.requests)
            outs.append(ModelRunnerOutput(list(g.req_ids), sampled))
        merged = merge_outputs(outs)
        assert merged.req_ids == so.req_ids
        sched.update_from_output(so, merged.sampled_token_ids)
        sched.kv_cache.check_invariants()
    else:
        raise AssertionError("not finished")
    return {rid: list(r.output_token_ids) for rid, r in reqs.items()}


@pytest.mark.parametrize("groups", [2, 3, 5])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_groups_compute_what_the_whole_step_would(groups, mode):
    sched, worker = make_scheduler(num_blocks=14, num_host_blocks=16 if mode == "swap" else 0,
                                   preemption_mode=mode, max_num_batched_tokens=40)
    shared = list(range(500, 509))  # two full blocks and a bit: later prompts hit them in the same step
    prompts = [shared + [10 + 7 * i + j for j in range(3 + i)] for i in range(5)]
    want = {}
    for i, p in enumerate(prompts):
        sched.add_request(make_request(f"r{i}", p, 12, arrival=float(i)))
        want[f"r{i}"] = reference_output(p, 12)
    for i in range(3):  # n = 3 samples sharing one prompt (forks and copy-on-write)
        sched.add_request(make_request(f"s#{i}", shared + [1, 2], 6, arrival=9.0, parent_id="s", sample_index=i))
        want[f"s#{i}"] = reference_output(shared + [1, 2], 6, salt=i)
    assert run_split(sched, worker, groups) == want
    assert sched.stats.num_preemptions > 0 and sched.stats.num_forked_samples == 2
    assert sched.kv_cache.num_free_blocks == 14


def test_bounds_balance_tokens_and_keep_every_group_nonempty():
    assert _bounds([1] * 8, 2) == [0, 4, 8]
    assert _bounds([100, 1, 1, 1], 2) == [0, 1, 4]
    assert _bounds([1, 1, 1, 100], 2) == [0, 3, 4]
    assert _bounds([200, 1, 1], 3) == [0, 1, 2, 3]
    assert _bounds([1] * 10, 3) == [0, 3, 7, 10]


def test_the_first_group_carries_the_block_ops_and_bitmask_rows_follow_their_requests():
    so = SchedulerOutput(req_ids=["a", "b", "c"], num_scheduled_tokens=[1, 1, 8], num_computed_tokens=[4, 5, 0],
                         token_ids=[[1], [2], list(range(8))], sample=[True, True, True],
                         finished_req_ids={"x"}, preempted_req_ids={"y"}, copy_blocks=[(1, 2)], swap_out=[(3, 0)],
                         grammar_bitmask=torch.tensor([[7], [9]], dtype=torch.int32),
                         structured_output_request_ids={"a": 0, "c": 1})
    first, second = split_step(so, 2)
    assert first.req_ids == ["a", "b"] and second.req_ids == ["c"]
    assert first.copy_blocks == [(1, 2)] and first.swap_out == [(3, 0)] and first.finished_req_ids == {"x"}
    assert not (second.copy_blocks or second.swap_out or second.finished_req_ids or second.preempted_req_ids)
    assert first.grammar_bitmask.tolist() == [[7]] and first.structured_output_request_ids == {"a": 0}
    assert second.grammar_bitmask.tolist() == [[9]] and second.structured_output_request_ids == {"c": 0}
    assert split_step(so, 1) == [so]
