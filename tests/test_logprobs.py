"""Sample and prompt logprobs equal transformers' log-softmax of the same logits (within 1e-4),
top-k ids and ranks included, under batching, chunked prefill and prefix caching."""
from __future__ import annotations

import math

import pytest
import torch

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    from engine.entrypoints.llm import LLM

    # a small token budget: long prompts are prefilled in several chunks
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=128, max_num_batched_tokens=24, seed=0)
    yield llm
    llm.shutdown()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_entry(entry: dict[int, Logprob], ref: torch.Tensor, token: int, k: int, label: str) -> None:
    """One position: the scored token with its rank, plus the top k ranked 1..k."""
    assert token in entry, label
    assert abs(entry[token].logprob - ref[token].item()) < ATOL, label
    # rank: 1 + tokens more likely; tokens within ATOL of it may fall either side (fp32 summation order)
    v = ref[token].item()
    lo, hi = int((ref > v + ATOL).sum()) + 1, int((ref >= v - ATOL).sum())
    assert lo <= entry[token].rank <= hi, f"{label}: rank {entry[token].rank} not in [{lo}, {hi}]"
    vals, ids = ref.topk(k)
    for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
        assert t in entry, f"{label}: top-{r} token {t} missing"
        assert abs(entry[t].logprob - v) < ATOL, label
        if t != token:
            assert entry[t].rank == r, label
    assert len(entry) == k + (0 if token in ids.tolist() else 1), label


def test_sample_and_prompt_logprobs_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = [
        "A longer prompt that is prefilled in several chunks because the budget is only twenty four tokens wide, "
        "so its prompt logprobs come from three or more steps and must line up across chunk boundaries.",
        "Short one",
        "Another prompt, sampled at temperature one",
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=4),
        SamplingParams(temperature=0, max_tokens=4, logprobs=0),
        SamplingParams(temperature=1.0, seed=7, max_tokens=6, logprobs=3, prompt_logprobs=0),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > 24 + 10
    for out, p in zip(outs, params):
        prompt_ids = out.prompt_token_ids
        comp = out.outputs[0]
        ref = hf_logprobs(hf_model, prompt_ids + comp.token_ids)
        P = len(prompt_ids)
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
        for j, (t, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            check_entry(entry, ref[P - 1 + j], t, p.logprobs, f"{out.prompt!r} output {j}")
            assert entry[t].decoded_token == tok.decode([t])
        expected_cum = sum(ref[P - 1 + j, t].item() for j, t in enumerate(comp.token_ids))
        assert math.isclose(comp.cumulative_logprob, expected_cum, abs_tol=1e-3)
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == P and out.prompt_logprobs[0] is None
        for i in range(1, P):
            check_entry(out.prompt_logprobs[i], ref[i - 1], prompt_ids[i], p.prompt_logprobs, f"prompt pos {i}")


def test_prompt_logprobs_complete_despite_prefix_cache_hits(llm, hf_model):
    shared = "This shared preamble is long enough to fill a couple of KV blocks for prefix caching. "
    first = llm.generate(shared + "First.", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    out = llm.generate(
        shared + "Second.", SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), use_tqdm=False
    )[0]
    assert out.num_cached_tokens == 0, "a request asking prompt logprobs must not reuse cached blocks"
    ids = out.prompt_token_ids
    assert ids[:16] == first.prompt_token_ids[:16]
    ref = hf_logprobs(hf_model, ids)
    assert all(e is not None for e in out.prompt_logprobs[1:])
    for i in range(1, len(ids)):
        check_entry(out.prompt_logprobs[i], ref[i - 1], ids[i], 2, f"pos {i}")
    # the same prompt without prompt logprobs does hit the cache
    again = llm.generate(shared + "Second.", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0


def test_n_samples_share_one_prompt_logprobs_and_each_has_logprobs(llm, hf_model):
    out = llm.generate(
        "Parallel samples", SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, logprobs=2, prompt_logprobs=1),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ref_prompt = hf_logprobs(hf_model, out.prompt_token_ids)
    for i in range(1, len(out.prompt_token_ids)):
        check_entry(out.prompt_logprobs[i], ref_prompt[i - 1], out.prompt_token_ids[i], 1, f"pos {i}")
    P = len(out.prompt_token_ids)
    for c in out.outputs:
        ref = hf_logprobs(hf_model, out.prompt_token_ids + c.token_ids)
        for j, t in enumerate(c.token_ids):
            check_entry(c.logprobs[j], ref[P - 1 + j], t, 2, f"sample {c.index} output {j}")


def test_logprobs_limits_and_no_logprobs(llm):
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=name):
            llm.generate("x", SamplingParams(**{name: 21}), use_tqdm=False)
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: -2})
    out = llm.generate("x", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is None and out.cumulative_logprob is None
    # the engine still serves after the rejected requests, and every block came back
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


def test_streamed_prompt_logprobs_arrive_once(llm):
    engine = llm.llm_engine
    engine.add_request("stream-pl", "Streaming prompt logprobs over several chunks of the prompt here.",
                       SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1, logprobs=1), delta=True)
    seen, positions = [], 0
    for _ in range(50):
        for out in engine.step():
            if out.request_id == "stream-pl":
                if out.prompt_logprobs is not None:
                    seen.append(out.prompt_logprobs)
                positions += len(out.outputs[0].logprobs or [])
        if not engine.has_unfinished_requests():
            break
    assert len(seen) == 1 and seen[0][0] is None and all(e is not None for e in seen[0][1:])
    assert positions == 3


@pytest.mark.slow
def test_default_model_logprobs_match_transformers(default_model_path):
    """The same checks on the real SmolLM2 weights: a chat prompt, greedy and seeded samples."""
    from transformers import AutoModelForCausalLM

    from engine.entrypoints.llm import LLM

    llm = LLM(seed=0, max_num_batched_tokens=32)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": "Name a prime number between 10 and 20."}]
    params = [SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, logprobs=2)]
    outs = [llm.chat(conv, p, use_tqdm=False)[0] for p in params]
    for out, p in zip(outs, params):
        c = out.outputs[0]
        ids = out.prompt_token_ids
        ref = hf_logprobs(hf, ids + c.token_ids)
        for j, t in enumerate(c.token_ids):
            check_entry(c.logprobs[j], ref[len(ids) - 1 + j], t, p.logprobs, f"output {j}")
        if p.prompt_logprobs is not None:
            for i in range(1, len(ids)):
                check_entry(out.prompt_logprobs[i], ref[i - 1], ids[i], p.prompt_logprobs, f"prompt pos {i}")
    llm.shutdown()
