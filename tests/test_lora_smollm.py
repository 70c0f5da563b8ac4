"""LoRA on SmolLM2-135M (the default model): adapters of two ranks and the base model in one batch
give transformers + peft's greedy tokens, and their logits agree within 1e-4 (prompt logprobs)."""
from __future__ import annotations

import pytest
import torch

from engine.entrypoints.llm import LLM
from engine.lora import LoRARequest
from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match
from tests.lora_utils import make_adapter, peft_greedy, peft_prompt_logprobs


@pytest.fixture(scope="module")
def smol_adapters(default_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-loras")
    return {
        "all16": make_adapter(default_model_path, d / "all16", r=16, alpha=16, std=0.02, seed=11,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        "qv8": make_adapter(default_model_path, d / "qv8", r=8, alpha=32, std=0.02, seed=12, targets=("q_proj", "v_proj"),
                            use_rslora=True),
    }


def test_smollm_mixed_batch_matches_peft(default_model_path, smol_adapters):
    tok_prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    llm = LLM(str(default_model_path), enable_lora=True, max_loras=2, max_lora_rank=16, num_gpu_blocks_override=64)
    tok = llm.get_tokenizer()
    ps = [tok.encode(p) for p in tok_prompts]
    names = ["all16", "qv8", None]
    loras = [LoRARequest(n, i + 1, str(smol_adapters[n])) if n else None for i, n in enumerate(names)]
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False,
                        lora_request=loras)
    for p, out, name in zip(ps, outs, names):
        ref = peft_greedy(default_model_path, smol_adapters[name] if name else None, [p], 10)[0]
        assert_greedy_match(list(out.outputs[0].token_ids), ref, label=str(name))
    ids = ps[1]
    lp = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                      lora_request=loras[0])[0]
    ref = peft_prompt_logprobs(default_model_path, smol_adapters["all16"], ids)
    got = torch.tensor([lp.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    base_lp = peft_prompt_logprobs(default_model_path, None, ids)
    assert (base_lp - ref).abs().max() > 1e-2  # the adapter really changes the logits
    eng = llm.llm_engine
    eng.kv_cache.check_invariants()
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks
