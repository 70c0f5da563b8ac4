"""Tensor parallelism on Ray (TP=2, gloo on loopback) gives the TP=1 (= transformers') tokens for the families whose
sharding differs from Llama's (which tests/test_ray_tp.py covers): per-head q/k norms, Gemma's
sandwich norms and soft-caps, fused checkpoint tensors split per rank (Phi-3), experts sharded like
dense MLPs (Mixtral, Qwen3-MoE) with a shared expert (Qwen2-MoE). One cluster for the module, one
TP=2 engine per family."""
from __future__ import annotations

import os

import pytest

from engine import LLM, SamplingParams
from tests.conftest import assert_greedy_match
from tests.models.tiny import hf_greedy, prompt_ids

pytestmark = pytest.mark.slow

TP_FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2-moe", "qwen3-moe"]
ENGINE = dict(kv_cache_memory_bytes=1 << 20, max_model_len=256)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("family", TP_FAMILIES)
def test_tp2_equals_tp1(ray_cluster, family_paths, family):
    """TP=1 equals transformers (test_families.py); so TP=2 is held to transformers' tokens directly,
    which saves a TP=1 engine start per family."""
    path = family_paths(family)
    prompts = prompt_ids(3)
    ref = hf_greedy(path, prompts, 12)
    llm = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        for i, out in enumerate(outs):
            assert_greedy_match(list(out.outputs[0].token_ids), ref[i], label=f"{family} TP=2 prompt {i}")
    finally:
        llm.shutdown()
