"""Greedy speculative decoding on the real SmolLM2 weights: token-identical to greedy decoding
without speculation on the golden prompts, batched, with chunked prefill and with preemption.

A first divergence is accepted only at a near-tie of the reference (top-2 logprobs within 1e-3),
where the summation order of a multi-token verification pass may flip fp32 argmaxes; the tokens
after it are not compared (the same rule as tests/test_offline_golden.py)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.spec_decode.truncate import make_truncated_draft
from tests.golden_prompts import golden_prompt_ids

pytestmark = pytest.mark.slow

MAX_NEW = 32
REF = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prompts(default_model_path):
    from transformers import AutoTokenizer

    return golden_prompt_ids(AutoTokenizer.from_pretrained(default_model_path))


@pytest.fixture(scope="module")
def reference(prompts):
    llm = LLM(enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], REF, use_tqdm=False)
    refs = []
    for o in outs:
        gaps = []
        for entry in o.outputs[0].logprobs:
            top = sorted((lp.logprob for lp in entry.values()), reverse=True)
            gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        refs.append((o.outputs[0].token_ids, gaps))
    return refs


@pytest.fixture(scope="module")
def draft_path(default_model_path, tmp_path_factory):
    # all layers but one: a draft that is right about a third of the time on these prompts
    return make_truncated_draft(default_model_path, tmp_path_factory.mktemp("draft29"), list(range(29)))


def _check(outs, reference, label):
    for i, (out, (ref, gaps)) in enumerate(zip(outs, reference)):
        got = out.outputs[0].token_ids
        for j, (a, b) in enumerate(zip(got, ref)):
            if a != b:
                assert gaps[j] < 1e-3, f"{label} prompt {i}: token {j} differs ({a} vs {b}), top-2 gap {gaps[j]:.3g}"
                break
        else:
            assert len(got) == len(ref) == MAX_NEW, label


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_golden_greedy_identical(prompts, reference, draft_path, method):
    # all prompts batched, prefill chunks of 48 tokens, and 40 blocks of 16: preemptions happen
    setting = dict(max_num_batched_tokens=48, num_gpu_blocks_override=40, enable_prefix_caching=False)
    spec = (
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
        if method == "ngram"
        else {"method": "draft_model", "model": str(draft_path), "num_speculative_tokens": 3}
    )
    llm = LLM(speculative_config=spec, **setting)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), reference, method)
    s = llm.get_stats()
    assert s["spec_num_accepted_tokens"] > 0, s
    assert s["scheduler_num_preemptions"] > 0, s
    assert s["kv_blocks_used"] == 0 and s["num_running"] == 0
