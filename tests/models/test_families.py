"""Every family against transformers on tiny random weights: greedy tokens for prompts longer than
the sliding windows, batched, with chunked prefill, prefix caching and preemption in one engine;
prefill logits within 1e-4 (fp32) through the C-kernel and torch attention backends."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import assert_greedy_match
from tests.models.tiny import engine_prefill_logits, family_configs, hf_greedy, hf_logits, prompt_ids

FAMILIES = list(family_configs())
MAX_TOKENS = 16
# 4 prompts of 34-61 tokens + 16 new need 18 blocks of 16: 10 force preemption; 32 tokens a step
# split every prompt into chunks, and decodes share steps with prefill chunks
ENGINE = dict(block_size=16, num_gpu_blocks_override=10, max_num_batched_tokens=32, max_model_len=256)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, family_paths):
    path = family_paths(family)
    prompts = prompt_ids()
    reference = hf_greedy(path, prompts, MAX_TOKENS)
    llm = LLM(str(path), **ENGINE)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for i, out in enumerate(outs):
            assert_greedy_match(list(out.outputs[0].token_ids), reference[i], label=f"{family} prompt {i}")
        stats = llm.get_stats()
        assert stats["scheduler_num_preemptions"] > 0, "the tiny cache must preempt"
        assert stats["kv_blocks_used"] == 0
        llm.llm_engine.kv_cache.check_invariants()
        runner = llm.llm_engine.executor.worker.runner
        if "moe" not in family and family != "mixtral":  # all-C passes (windows, q/k norms, GeGLU) replay as plans
            assert runner.graph_runner is not None and runner.graph_runner.num_replays > 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_within_1e4(family, family_paths):
    path = family_paths(family)
    ids = prompt_ids(1)[0] + prompt_ids(1, seed=1)[0][:20]  # 61 tokens
    want = hf_logits(path, ids)
    for backend in ("cpu", "torch"):
        got = engine_prefill_logits(path, ids, backend)
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"{family} via {backend}: max |logit difference| {err:.2e}"
