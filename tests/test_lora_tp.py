"""LoRA under tensor parallelism (TP=2 on Ray, CPU gloo): A and B are sharded like the layers they
attach to, including padded / replicated heads (6 query and 3 KV heads over 2 ranks), and every
output still equals transformers + peft."""
from __future__ import annotations

import os

import pytest

from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from tests.conftest import assert_greedy_match, make_tiny_llama
from tests.lora_utils import make_adapter, peft_greedy

pytestmark = pytest.mark.slow

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_tp2_mixed_adapters_match_peft(tmp_path, default_model_path):
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    base = make_tiny_llama(tmp_path / "base", default_model_path, hidden_size=96, num_heads=6, num_kv_heads=3,
                           intermediate_size=128)
    a1 = make_adapter(base, tmp_path / "a1", r=8, targets=ALL, seed=1)
    a2 = make_adapter(base, tmp_path / "a2", r=4, targets=("k_proj", "v_proj", "o_proj", "down_proj"), seed=2)
    names = [a1, a2, None, a1]
    ps = [[1] + [200 + 17 * i + 5 * j for j in range(6 + 2 * i)] for i in range(len(names))]
    loras = [LoRARequest(p.name, 1 if p == a1 else 2, str(p)) if p else None for p in names]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        llm = LLM(str(base), tensor_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=8,
                  num_gpu_blocks_override=64)
        try:
            outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False,
                                lora_request=loras)
            eng = llm.llm_engine
            assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()
    for i, (p, out, adapter) in enumerate(zip(ps, outs, names)):
        ref = peft_greedy(base, adapter, [p], 10)[0]
        assert_greedy_match(list(out.outputs[0].token_ids), ref, label=f"TP=2 prompt {i}")
