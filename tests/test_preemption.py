"""End to end on the real model: a tiny KV cache forces preemption (recompute and swap), and the
priority policy reorders and preempts; greedy output must still equal transformers."""
from __future__ import annotations

import pytest

from engine.entrypoints.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match
from tests.e2e_cache_prompts import MAX_TOKENS, hf_reference, prompt_ids

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
NUM_PROMPTS = 4
TINY = dict(block_size=16, num_gpu_blocks_override=9)  # one ~67-token sequence needs 5 blocks


@pytest.fixture(scope="module")
def prompts(default_model_path):
    from transformers import AutoTokenizer

    return prompt_ids(AutoTokenizer.from_pretrained(str(default_model_path)))


@pytest.fixture(scope="module")
def reference(default_model_path, prompts):
    return hf_reference(default_model_path, tuple(tuple(p) for p in prompts))


def _check(llm: LLM, outs, reference, label: str) -> dict:
    for i, out in enumerate(outs):
        assert_greedy_match(list(out.outputs[0].token_ids), reference[i], label=f"{label} prompt {i}")
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0 and st["kv_host_blocks_free"] == st["kv_host_blocks_total"]
    llm.llm_engine.kv_cache.check_invariants()
    return st


def test_preemption_by_recompute(default_model_path, prompts, reference):
    llm = LLM(str(default_model_path), **TINY)
    ids = [{"prompt_token_ids": p} for p in prompts[:NUM_PROMPTS]]
    st = _check(llm, llm.generate(ids, GREEDY, use_tqdm=False), reference, "recompute")
    assert st["scheduler_num_recompute_preemptions"] > 0 and st["scheduler_num_swap_preemptions"] == 0

    # a seeded random request continues its random stream across preemptions
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = llm.generate(ids[-1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    before = llm.get_stats()["scheduler_num_preemptions"]
    crowded = llm.generate(ids, [GREEDY] * (NUM_PROMPTS - 1) + [seeded], use_tqdm=False)
    assert llm.get_stats()["scheduler_num_preemptions"] > before
    assert crowded[-1].outputs[0].token_ids == alone
    llm.shutdown()


def test_preemption_by_swap(default_model_path, prompts, reference):
    llm = LLM(str(default_model_path), preemption_mode="swap", swap_space=0.02, **TINY)
    ids = [{"prompt_token_ids": p} for p in prompts[:NUM_PROMPTS]]
    st = _check(llm, llm.generate(ids, GREEDY, use_tqdm=False), reference, "swap")
    assert st["scheduler_num_swap_preemptions"] > 0 and st["swapped_out_blocks"] > 0
    # every block swapped out came back: copied from host, or found still cached on the device
    assert st["swapped_in_blocks"] + st["swap_in_cache_hits"] == st["swapped_out_blocks"]

    # abort a request while it is swapped out: its host and device blocks all come back
    engine = llm.llm_engine
    for i, p in enumerate(ids):
        engine.add_request(f"a{i}", p, GREEDY)
    swapped = None
    for _ in range(200):
        engine.step()
        swapped = next((r for r in engine.scheduler.waiting if engine.kv_cache.is_swapped(r)), None)
        if swapped is not None:
            break
    assert swapped is not None
    engine.abort_request(swapped.request_id)
    assert not engine.kv_cache.is_swapped(swapped) and swapped.request_id not in engine.scheduler.requests
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0 and st["kv_host_blocks_free"] == st["kv_host_blocks_total"]
    llm.shutdown()


def test_priority_policy(default_model_path, prompts, reference):
    # ~50-token prompts: 7 blocks of 8 each, 9 once generated; two fit at first, not as they grow
    # (prefix caching off: the prompts share a system prompt, and shared blocks would make them fit)
    llm = LLM(str(default_model_path), scheduling_policy="priority", block_size=8, num_gpu_blocks_override=16,
              enable_prefix_caching=False)
    ids = [{"prompt_token_ids": p} for p in prompts[:NUM_PROMPTS]]
    priorities = [3, 1, 2, 0]
    engine = llm.llm_engine
    for i, (p, prio) in enumerate(zip(ids, priorities)):
        engine.add_request(f"p{i}", p, GREEDY, priority=prio)
    finished_order, outs = [], {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished_order.append(out.request_id)
                outs[out.request_id] = out
    assert not engine.has_unfinished_requests()
    st = _check(llm, [outs[f"p{i}"] for i in range(NUM_PROMPTS)], reference, "priority")
    assert finished_order[0] == "p3"  # priority 0 first
    assert st["scheduler_num_preemptions"] > 0
    # a high-priority arrival preempts a running low-priority request
    engine.add_request("low", ids[0], GREEDY, priority=9)
    engine.add_request("low2", ids[1], GREEDY, priority=9)
    for _ in range(2):
        engine.step()
    before = engine.get_stats()["scheduler_num_priority_preemptions"]
    engine.add_request("high", ids[2], GREEDY, priority=-1)
    done = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.get_stats()["scheduler_num_priority_preemptions"] > before
    for rid, i in (("low", 0), ("low2", 1), ("high", 2)):
        assert_greedy_match(list(done[rid].outputs[0].token_ids), reference[i], label=f"priority {rid}")
    llm.shutdown()
