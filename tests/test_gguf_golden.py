"""The default model with its Q4_1 GGUF weights kept quantized (``quantization="gguf"``): greedy
output equals transformers on the dequantized checkpoint whatever the batch composition, chunking
or preemption; logprobs match the fp32 path; decode steps replay kernel plans; a sixth of the
weight bytes."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.worker.cpu_graph import CpuGraphRunner
from tests.conftest import assert_greedy_match, hf_greedy
from tests.golden_prompts import golden_prompt_ids

pytestmark = pytest.mark.slow

MAX_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# four of the golden prompts (5 to 284 tokens): tests/test_offline_golden.py runs all of them in fp32,
# whose bits the GGUF kernels reproduce; these keep the transformers reference short
SUBSET = (0, 3, 5, 9)


@pytest.fixture(scope="module")
def prompts(default_model_path):
    from transformers import AutoTokenizer

    ids = golden_prompt_ids(AutoTokenizer.from_pretrained(default_model_path))
    return [ids[i] for i in SUBSET]


@pytest.fixture(scope="module")
def reference(default_model_path, prompts):
    return hf_greedy(default_model_path, prompts, MAX_NEW)


@pytest.fixture(scope="module")
def gguf_llm():
    return LLM(quantization="gguf", enable_prefix_caching=False)


def _run(llm: LLM, prompts):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)


def _check(outs, reference, label):
    assert len(outs) == len(reference)
    for i, (out, ref) in enumerate(zip(outs, reference)):
        assert out.outputs[0].finish_reason == "length"
        assert_greedy_match(out.outputs[0].token_ids, ref, label=f"{label} prompt {i}")


def test_weights_stay_quantized(gguf_llm):
    from engine.layers.quantization.gguf import GGUFLinearMethod

    worker = gguf_llm.llm_engine.executor.worker
    model = worker.runner.model
    kept = [m for m in model.modules() if getattr(m, "gguf_type", None) is not None]
    assert len(kept) == 30 * 4 + 2  # qkv, o, gate_up, down per layer; the tied embedding and LM head
    assert isinstance(model.lm_head.linear_method, GGUFLinearMethod)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one copy of the Q8_0 blocks
    assert 90e6 < worker.weight_bytes() < 100e6  # against 538 MB in fp32


def test_batched(gguf_llm, prompts, reference):
    _check(_run(gguf_llm, prompts), reference, "gguf batched")
    single = gguf_llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)[0]
    _check([single], reference[:1], "gguf alone")
    runner = gguf_llm.llm_engine.executor.worker.runner.graph_runner
    assert isinstance(runner, CpuGraphRunner) and runner.num_replays > 0
    assert runner.plans.get(1) is not None  # a batch-1 decode step is all C kernels, GGUF ones included
    assert gguf_llm.get_stats()["kv_blocks_used"] == 0


def test_chunked_prefill_and_preemption(prompts, reference):
    # 24 blocks of 16 = 384 tokens: the longest prompt fits, all of them together do not
    llm = LLM(quantization="gguf", max_num_batched_tokens=48, num_gpu_blocks_override=24,
              enable_prefix_caching=False)
    outs = _run(llm, prompts)
    stats = llm.get_stats()
    assert stats["scheduler_num_preemptions"] > 0
    assert stats["scheduler_num_steps"] > sum(len(p) for p in prompts) // 48
    _check(outs, reference, "gguf chunked + preempted")
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_logprobs_match_the_fp32_path(gguf_llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, ignore_eos=True)
    fp32 = LLM(enable_prefix_caching=False)
    few = prompts[:3]
    got = gguf_llm.generate([{"prompt_token_ids": p} for p in few], params, use_tqdm=False)
    want = fp32.generate([{"prompt_token_ids": p} for p in few], params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        first_g, first_w = g.outputs[0].logprobs[0], w.outputs[0].logprobs[0]
        assert set(first_g) == set(first_w)
        for tok in first_w:
            assert abs(first_g[tok].logprob - first_w[tok].logprob) <= 1e-4


def test_default_model_is_unchanged_without_the_flag():
    from engine.config import EngineArgs

    args = EngineArgs()
    from engine.layers.quantization.gguf import resolve_gguf

    assert resolve_gguf(args.model, None) == (None, None)
    with pytest.raises(ValueError, match="reads the weights of a .gguf file"):
        resolve_gguf("/nonexistent/dir", "gguf")
    assert torch.get_default_dtype() == torch.float32
