"""Greedy output equals Hugging Face transformers on the real SmolLM2 weights (fp32), whatever the
batch composition, chunking or preemption.

A divergence is accepted only at a step where transformers' own top-2 logits are within 1e-3
(see ``assert_greedy_match``): such near-ties can flip with the summation order of fp32 matmuls.
"""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.golden_prompts import golden_prompt_ids

pytestmark = pytest.mark.slow

MAX_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(default_model_path):
    from transformers import AutoTokenizer

    return golden_prompt_ids(AutoTokenizer.from_pretrained(default_model_path))


@pytest.fixture(scope="module")
def reference(default_model_path, prompts):
    return hf_greedy(default_model_path, prompts, MAX_NEW)


def _run(llm: LLM, prompts, one_at_a_time: bool = False):
    if one_at_a_time:
        return [llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0] for p in prompts]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


def _check(outs, reference, label):
    assert len(outs) == len(reference)
    for i, (out, ref) in enumerate(zip(outs, reference)):
        assert out.outputs[0].finish_reason == "length"
        assert_greedy_match(out.outputs[0].token_ids, ref, label=f"{label} prompt {i}")


def _assert_all_blocks_free(llm: LLM):
    stats = llm.get_stats()
    assert stats["kv_blocks_used"] == 0, stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_prompts_cover_lengths(prompts):
    lengths = [len(p) for p in prompts]
    assert len(prompts) >= 10 and min(lengths) == 5 and 450 <= max(lengths) <= 500, lengths


def test_one_at_a_time_and_batched(default_model_path, prompts, reference):
    llm = LLM(enable_prefix_caching=False)
    _check(_run(llm, prompts, one_at_a_time=True), reference, "one at a time")
    _assert_all_blocks_free(llm)
    _check(_run(llm, prompts), reference, "batched")
    _assert_all_blocks_free(llm)


def test_chunked_prefill(prompts, reference):
    llm = LLM(max_num_batched_tokens=48, enable_prefix_caching=False)
    outs = _run(llm, prompts)
    _check(outs, reference, "chunked prefill")
    # the long prompts really were split: a step never computes more than the budget
    assert llm.get_stats()["scheduler_num_steps"] > sum(len(p) for p in prompts) // 48
    _assert_all_blocks_free(llm)


def test_preemption_by_recompute(prompts, reference):
    # 40 blocks of 16 = 640 tokens: the longest prompt fits, all of them together do not
    llm = LLM(num_gpu_blocks_override=40, enable_prefix_caching=False)
    outs = _run(llm, prompts)
    assert llm.get_stats()["scheduler_num_preemptions"] > 0
    _check(outs, reference, "preemption")
    _assert_all_blocks_free(llm)
