"""End to end on the real model: prefix caching and n > 1 prompt sharing leave greedy output unchanged."""
from __future__ import annotations

import os

import pytest

from engine.entrypoints.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match
from tests.e2e_cache_prompts import MAX_TOKENS, hf_reference, prompt_ids

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(default_model_path):
    from transformers import AutoTokenizer

    return prompt_ids(AutoTokenizer.from_pretrained(str(default_model_path)))


@pytest.fixture(scope="module")
def reference(default_model_path, prompts):
    return hf_reference(default_model_path, tuple(tuple(p) for p in prompts))


def _tokens(outs):
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def _all_free(llm: LLM) -> None:
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"]
    llm.llm_engine.kv_cache.check_invariants()


def test_prefix_caching_on_and_off_match_transformers(default_model_path, prompts, reference):
    outputs = {}
    for caching in (False, True):
        llm = LLM(str(default_model_path), enable_prefix_caching=caching, num_gpu_blocks_override=128,
                  max_num_batched_tokens=256)
        first = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        # the same prompts again: with caching everything but the last block's tokens is a hit
        again = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY, use_tqdm=False)
        st = llm.get_stats()
        _all_free(llm)
        outputs[caching] = _tokens(first)
        for i, out in enumerate(first):
            assert_greedy_match(list(out.outputs[0].token_ids), reference[i], label=f"caching={caching} prompt {i}")
        assert _tokens(again) == outputs[caching][:2]
        if caching:
            common = len(os.path.commonprefix(prompts))
            expected = (len(prompts) - 1) * (common // 16 * 16) + sum((len(p) - 1) // 16 * 16 for p in prompts[:2])
            assert common >= 32 and st["prefix_cache_hits"] == expected
            assert all(o.num_cached_tokens > 0 for o in again)
            assert st["prefix_cache_queries"] == sum(map(len, prompts)) + sum(map(len, prompts[:2]))
        else:
            assert st["prefix_cache_hits"] == 0
        llm.shutdown()
    assert outputs[True] == outputs[False]


def test_n4_shares_the_prompt_and_matches_greedy(default_model_path, prompts, reference):
    llm = LLM(str(default_model_path), num_gpu_blocks_override=128)
    # top_k=1 samples the argmax (greedy proper rejects n > 1)
    params = SamplingParams(n=4, temperature=1.0, top_k=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
    st = llm.get_stats()
    for i, out in enumerate(outs):
        assert len(out.outputs) == 4
        for c in out.outputs:
            assert_greedy_match(list(c.token_ids), reference[i], label=f"n=4 prompt {i} sample {c.index}")
    assert st["scheduler_num_forked_samples"] == 6
    assert st["shared_prompt_tokens"] == 3 * (len(prompts[0]) - 1) + 3 * (len(prompts[1]) - 1)
    # each prompt's prefill ran once; the three other samples recomputed one token each
    assert st["scheduler_num_prefill_tokens"] == len(prompts[0]) + len(prompts[1]) - st["prefix_cache_hits"]
    _all_free(llm)

    # seeded random samples that share the prompt equal independent requests with the same seeds
    shared = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    got = llm.generate({"prompt_token_ids": prompts[2]}, shared, use_tqdm=False)[0]
    alone = [
        llm.generate({"prompt_token_ids": prompts[2]}, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=8,
                     ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
        for i in range(4)
    ]
    assert [list(c.token_ids) for c in got.outputs] == [list(a) for a in alone]
    assert len({tuple(a) for a in alone}) > 1  # they really are different samples
    _all_free(llm)
    llm.shutdown()
