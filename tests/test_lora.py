"""LoRA adapters on the tiny Llama: every output equals transformers + peft with that adapter, in
batches that mix adapters and base rows, under chunked prefill, preemption (recompute and swap),
n > 1, n-gram speculation and structured outputs; bad adapters are typed errors."""
from __future__ import annotations

import re

import pytest
import torch

from engine.entrypoints.llm import LLM
from engine.lora import LoRARequest
from engine.lora.adapter import LoRAError, LoRANotFoundError
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputsParams as SO
from tests.conftest import assert_greedy_match, make_tiny_llama
from tests.lora_utils import make_adapter, peft_greedy, peft_prompt_logprobs

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    """Three adapters of different ranks, targets and scalings (one rsLoRA)."""
    d = tmp_path_factory.mktemp("loras")
    return {
        "all8": make_adapter(tiny_model_path, d / "all8", r=8, alpha=16, targets=ALL, seed=1),
        "qv4": make_adapter(tiny_model_path, d / "qv4", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=2,
                            use_rslora=True),
        "mlp16": make_adapter(tiny_model_path, d / "mlp16", r=16, alpha=32, targets=("gate_proj", "up_proj", "down_proj"),
                              seed=3),
    }


def lreq(adapters, name: str | None) -> LoRARequest | None:
    if name is None:
        return None
    return LoRARequest(name, 1 + sorted(adapters).index(name), str(adapters[name]))


def prompts(n: int, length: int = 5) -> list[list[int]]:
    return [[1] + [100 + 37 * i + 11 * j for j in range(length + 3 * (i % 4))] for i in range(n)]


def clean(llm: LLM) -> None:
    eng = llm.llm_engine
    eng.kv_cache.check_invariants()
    assert eng.kv_cache.num_free_blocks == eng.kv_cache.num_blocks
    assert not eng.has_unfinished_requests()


def check_against_peft(tiny_model_path, adapters, outs, ps, names, max_tokens=12) -> None:
    refs = {}
    for name in set(names):
        idx = [i for i, n in enumerate(names) if n == name]
        path = adapters[name] if name is not None else None
        for i, r in zip(idx, peft_greedy(tiny_model_path, path, [ps[i] for i in idx], max_tokens)):
            refs[i] = r
    for i, out in enumerate(outs):
        assert_greedy_match(list(out.outputs[0].token_ids), refs[i], label=f"prompt {i} adapter {names[i]}")


def test_mixed_batch_matches_peft(tiny_model_path, adapters):
    names = ["all8", "qv4", None, "mlp16", "all8", None, "mlp16", "qv4"]
    ps = prompts(len(names))
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=4, max_lora_rank=16, num_gpu_blocks_override=128)
    outs = llm.generate(ps, GREEDY, use_tqdm=False, lora_request=[lreq(adapters, n) for n in names])
    check_against_peft(tiny_model_path, adapters, outs, ps, names)
    # on CPU the decode steps that mixed adapters and base rows replayed kernel plans with the LoRA kernel
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graph_runner is not None and runner.graph_runner.max_loras == 4
    assert runner.graph_runner.num_replays > 0
    # the adapters change the output (a zero B would pass the comparison trivially)
    base = llm.generate(ps[:4], GREEDY, use_tqdm=False)
    for i in (0, 1, 3):
        assert outs[i].outputs[0].token_ids != base[i].outputs[0].token_ids, names[i]
    assert outs[2].outputs[0].token_ids == base[2].outputs[0].token_ids
    clean(llm)


def test_prompt_logprobs_within_1e4(tiny_model_path, adapters):
    ids = prompts(1, 20)[0]
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=3, max_lora_rank=16, num_gpu_blocks_override=64)
    p = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    names = ["all8", "qv4", "mlp16", None]
    outs = llm.generate([ids] * 4, p, use_tqdm=False, lora_request=[lreq(adapters, n) for n in names])
    for name, out in zip(names, outs):
        ref = peft_prompt_logprobs(tiny_model_path, adapters[name] if name else None, ids)
        got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (name, (got - ref).abs().max())
    clean(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_chunked_prefill_preemption_and_slot_eviction(tiny_model_path, adapters, mode):
    """Two slots for three adapters (the scheduler holds back the third), prefill chunks of 16
    tokens, and a cache small enough to preempt: outputs still equal peft's."""
    names = ["all8", "qv4", "mlp16", None, "qv4", "all8", "mlp16", None, "all8"]
    ps = prompts(len(names), 18)
    kw = dict(swap_space=0.01, preemption_mode="swap") if mode == "swap" else {}
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2,
              num_gpu_blocks_override=14, block_size=8, max_num_batched_tokens=16, **kw)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False,
                        lora_request=[lreq(adapters, n) for n in names])
    check_against_peft(tiny_model_path, adapters, outs, ps, names, 24)
    st = llm.get_stats()
    assert st.scheduler.num_preemptions > 0
    if mode == "swap":
        assert st.scheduler.num_swap_preemptions > 0
    lora = llm.llm_engine.executor.worker.runner.lora
    assert lora.num_loads > 3  # three adapters through two slots and a host LRU of two: reloads happened
    clean(llm)


def test_prefix_cache_is_per_adapter(tiny_model_path, adapters):
    ids = prompts(1, 40)[0]
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=2, max_lora_rank=16, num_gpu_blocks_override=64)
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    a, b = lreq(adapters, "all8"), lreq(adapters, "qv4")
    first = llm.generate([ids], p, use_tqdm=False, lora_request=a)[0]
    other = llm.generate([ids], p, use_tqdm=False, lora_request=b)[0]
    base = llm.generate([ids], p, use_tqdm=False)[0]
    again = llm.generate([ids], p, use_tqdm=False, lora_request=a)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert again.num_cached_tokens > 0  # the same adapter does hit its own blocks
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    ref = peft_greedy(tiny_model_path, adapters["qv4"], [ids], 4)[0]
    assert_greedy_match(list(other.outputs[0].token_ids), ref, label="second adapter after the first")
    clean(llm)


def test_n_samples_ngram_speculation_and_structured_outputs(tiny_model_path, adapters):
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=2, max_lora_rank=16, num_gpu_blocks_override=128,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})
    ps = [[1] + [100, 200, 300, 100, 200, 300, 100, 200] * 2, prompts(1)[0]]
    names = ["all8", "qv4"]
    # n = 2 samples with top_k = 1: each is the greedy continuation, sharing the prompt's blocks
    outs = llm.generate(ps, SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True, n=2), use_tqdm=False,
                        lora_request=[lreq(adapters, n) for n in names])
    for out, name, p in zip(outs, names, ps):
        ref = peft_greedy(tiny_model_path, adapters[name], [p], 16)[0]
        for sample in out.outputs:
            assert_greedy_match(list(sample.token_ids), ref, label=f"{name} sample {sample.index}")
    assert llm.llm_engine.scheduler.spec_stats.num_draft_tokens > 0
    so = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=SO(regex="[0-9]{3}"))
    out = llm.generate(["Count:"], so, use_tqdm=False, lora_request=lreq(adapters, "all8"))[0]
    assert re.fullmatch("[0-9]{3}", out.outputs[0].text), out.outputs[0].text
    clean(llm)


def test_bad_adapters_are_typed_errors_and_the_engine_keeps_serving(tiny_model_path, adapters, tmp_path,
                                                                   default_model_path):
    llm = LLM(str(tiny_model_path), enable_lora=True, max_loras=1, max_lora_rank=8, num_gpu_blocks_override=32)
    other_base = make_tiny_llama(tmp_path / "other", default_model_path, hidden_size=32, intermediate_size=64)
    wrong_shape = make_adapter(other_base, tmp_path / "wrong", r=4, targets=("q_proj",))
    lm_head = make_adapter(tiny_model_path, tmp_path / "head", r=4, targets=("q_proj", "lm_head"))
    cases = [
        (LoRARequest("big", 1, str(adapters["mlp16"])), LoRAError, "max_lora_rank"),
        (LoRARequest("shape", 2, str(wrong_shape)), LoRAError, "another base model"),
        (LoRARequest("head", 3, str(lm_head)), LoRAError, "lm_head"),
        (LoRARequest("missing", 4, str(tmp_path / "nowhere")), LoRANotFoundError, "adapter_config.json"),
    ]
    for lr, exc, words in cases:
        with pytest.raises(exc, match=words):
            llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False, lora_request=lr)
    ok = LoRARequest("qv4", 5, str(adapters["qv4"]))
    out = llm.generate([prompts(1)[0]], GREEDY, use_tqdm=False, lora_request=ok)[0]
    assert_greedy_match(list(out.outputs[0].token_ids), peft_greedy(tiny_model_path, adapters["qv4"], prompts(1), 12)[0])
    with pytest.raises(LoRAError, match="already names"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False, lora_request=LoRARequest("x", 5, str(adapters["all8"])))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("zero", 0, str(adapters["qv4"]))
    clean(llm)
    plain = LLM(str(tiny_model_path), num_gpu_blocks_override=16)
    with pytest.raises(LoRAError, match="enable_lora"):
        plain.generate([[1, 2, 3]], GREEDY, use_tqdm=False, lora_request=ok)
    clean(plain)
