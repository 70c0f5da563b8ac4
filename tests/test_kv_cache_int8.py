"""``kv_cache_dtype="int8"`` end to end: the cache holds ~3.8x the tokens in the same bytes, the real
model's output stays close to the fp32 cache's, and the result does not depend on batching,
chunking, prefix caching or preemption by swap (every query attends to what is stored).

Measured on SmolLM2, teacher-forced over the golden prompts and their 64-token fp32 greedy
continuations (1,657 scored tokens): int8 KV moves the scored token's logprob by 0.025 on average
and 0.40 at most, keeps fp32's top-1 token at 97.9% of positions, and perplexity goes from 8.172 to
8.162. Greedy int8-KV output first differs from the fp32 cache's at steps where fp32's top-2 logits
are at most 0.052 apart; INT8_KV_TIE = 0.25 is the near-tie bound the tests accept.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.entrypoints.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match

INT8_KV_TIE = 0.25
CACHE_BYTES = 256 << 20


def _gaps(out) -> list[float]:
    gaps = []
    for step in out.outputs[0].logprobs:
        top = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(top[0] - top[1])  # top-2 logprob gap == top-2 logit gap
    return gaps


# ---- the real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    fp32 = LLM(enable_prefix_caching=False, kv_cache_memory_bytes=CACHE_BYTES)
    int8 = LLM(enable_prefix_caching=False, kv_cache_memory_bytes=CACHE_BYTES, kv_cache_dtype="int8")
    yield fp32, int8
    fp32.shutdown()
    int8.shutdown()


@pytest.fixture(scope="module")
def prompts(engines):
    from tests.golden_prompts import golden_prompt_ids

    return golden_prompt_ids(engines[0].get_tokenizer())


@pytest.fixture(scope="module")
def fp32_greedy(engines, prompts):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=2)
    return engines[0].generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.mark.slow
def test_an_int8_cache_holds_3_7x_the_tokens_in_the_same_bytes(engines):
    fp32, int8 = (llm.llm_engine for llm in engines)
    assert fp32.config.cache.cache_dtype == "auto" and int8.config.cache.cache_dtype == "int8"
    assert int8.kv_cache.num_blocks >= 3.7 * fp32.kv_cache.num_blocks  # 256 / 68 bytes per token and head
    runner = int8.executor.worker.runner
    k, v = runner.kv_caches[0]
    assert k.dtype == torch.int8 and k.shape[-1] == 64 + 4 and v.shape == k.shape


@pytest.mark.slow
def test_int8_kv_logprobs_stay_close_to_the_fp32_cache(engines, prompts, fp32_greedy):
    """Teacher-forced over prompt + fp32 continuation: every position's scored-token logprob and
    top-1 token, through the prefill path reading int8 blocks."""
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, fp32_greedy)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    scored, top1 = [], []
    for llm in engines:
        outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        lps, tops = [], []
        for s, o in zip(seqs, outs):
            for j, d in enumerate(o.prompt_logprobs[1:], start=1):
                lps.append(d[s[j]].logprob)
                tops.append(max(d.items(), key=lambda kv: kv[1].logprob)[0])
        scored.append(lps)
        top1.append(tops)
    diffs = (torch.tensor(scored[0]) - torch.tensor(scored[1])).abs()
    agree = sum(a == b for a, b in zip(*top1)) / len(top1[0])
    ppl = [math.exp(-sum(lp) / len(lp)) for lp in scored]
    assert len(diffs) > 1500
    assert diffs.mean() < 0.05, f"mean |logprob change| {diffs.mean():.3f}"  # measured 0.025
    assert diffs.max() < 1.0, f"max |logprob change| {diffs.max():.3f}"  # measured 0.40
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"  # measured 0.979
    assert abs(ppl[1] / ppl[0] - 1) < 0.01, f"perplexity fp32 cache {ppl[0]:.3f}, int8 {ppl[1]:.3f}"


@pytest.mark.slow
def test_int8_kv_greedy_matches_the_fp32_cache_up_to_near_ties(engines, prompts, fp32_greedy):
    """Through the decode kernel: greedy output equals the fp32 cache's up to a step where fp32's
    top-2 logits are within INT8_KV_TIE."""
    int8 = engines[1]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = int8.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    matched = 0
    for i, (out, ref) in enumerate(zip(outs, fp32_greedy)):
        want = {"tokens": list(ref.outputs[0].token_ids), "gaps": _gaps(ref)}
        got = list(out.outputs[0].token_ids)
        assert_greedy_match(got, want, tie_eps=INT8_KV_TIE, label=f"int8 KV prompt {i}")
        matched += next((j for j, (a, b) in enumerate(zip(got, want["tokens"])) if a != b), len(got))
    assert matched >= 0.5 * 64 * len(prompts), matched  # not vacuous: measured 420 of 640
    kv = int8.llm_engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks  # every block returned


# ---- batching, chunking, prefix caching, swapping (tiny model) -----------------------------------

SHARED = list(range(300, 340))  # a 40-token prefix the prompts share (two and a half blocks)
PROMPTS = [SHARED + list(range(1000 + 7 * i, 1000 + 7 * i + 5 + 9 * i)) for i in range(6)]
TOKENS = 24


def _run(path, prompts, **kwargs):
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="int8", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0
    llm.llm_engine.kv_cache.check_invariants()
    llm.shutdown()
    return outs, st


@pytest.mark.slow
def test_int8_kv_output_does_not_depend_on_batching_chunking_caching_or_swapping(tiny_model_path):
    # the reference: one request at a time, whole prompts, nothing cached
    alone, _ = _run(tiny_model_path, PROMPTS, enable_prefix_caching=False, max_num_seqs=1)
    refs = [{"tokens": list(o.outputs[0].token_ids), "gaps": _gaps(o)} for o in alone]
    variants = {
        "batched, 16-token chunks, prefix cached": dict(max_num_batched_tokens=16, enable_prefix_caching=True),
        "preempted by swap": dict(num_gpu_blocks_override=10, preemption_mode="swap", swap_space=0.01,
                                  enable_prefix_caching=False),
    }
    for label, kwargs in variants.items():
        outs, st = _run(tiny_model_path, PROMPTS + PROMPTS[:2], **kwargs)
        if "swap" in label:
            assert st["scheduler_num_swap_preemptions"] > 0
        else:
            assert st["prefix_cache_hits"] >= 32 * (len(PROMPTS) + 1)  # every prompt after the first
        same = 0
        for i, out in enumerate(outs):
            got, ref = list(out.outputs[0].token_ids), refs[i % len(PROMPTS)]
            assert_greedy_match(got, ref, label=f"{label}, prompt {i}")
            same += got == ref["tokens"]
        assert same >= len(outs) - 2, f"{label}: only {same} of {len(outs)} identical"  # not vacuous: measured all 8
