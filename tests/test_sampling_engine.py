"""Sampling options through the whole engine: n, seeds, validation, and penalised greedy requests
inside a mixed batch equal to transformers' generate with the same processors."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    from engine.entrypoints.llm import LLM

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256, seed=0)
    yield llm
    llm.shutdown()


def hf_generate(model_path, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> dict:
    """Greedy tokens from transformers with its own logits processors, and each step's top-2 gap
    of the processed scores (near-ties may flip under a different summation order)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kwargs,
        )
    gaps = []
    for s in out.scores:
        top2 = s[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return {"tokens": out.sequences[0, len(prompt_ids):].tolist(), "gaps": gaps}


def test_penalised_greedy_requests_in_a_mixed_batch_match_transformers(llm, tiny_model_path):
    tok = llm.get_tokenizer()
    prompt = tok.encode("the the the cat sat on the mat and the cat")
    n = 12
    cases = [
        (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), {}),
        (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, repetition_penalty=1.8),
         {"repetition_penalty": 1.8}),
        (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, repetition_penalty=0.6),
         {"repetition_penalty": 0.6}),
        (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logit_bias={451: 0.5, 905: 0.4}),
         {"sequence_bias": {(451,): 0.5, (905,): 0.4}}),
    ]
    plain = hf_generate(tiny_model_path, prompt, n)
    # bad words: ban the plain greedy continuation's second token wherever it would appear
    banned = plain["tokens"][1]
    cases.append((SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, bad_words=[tok.decode([banned])]),
                  None))
    # sampled neighbours in the same batch must not disturb the greedy rows
    noise = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=n, presence_penalty=1.0, frequency_penalty=0.5),
             SamplingParams(temperature=0.7, min_p=0.1, max_tokens=n, seed=5)]
    params = [c[0] for c in cases] + noise
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    for i, (p, hf_kwargs) in enumerate(cases):
        got = outs[i].outputs[0].token_ids
        if hf_kwargs is None:
            bad_ids = p.clone()
            bad_ids.update_from_tokenizer(tok, 49152)
            ref = hf_generate(tiny_model_path, prompt, n, bad_words_ids=bad_ids.bad_words_token_ids)
            assert all(t != banned for t in got)
        else:
            ref = hf_generate(tiny_model_path, prompt, n, **hf_kwargs)
        assert_greedy_match(got, ref, label=f"case {i}")
    # the penalties changed the continuation (otherwise the comparison proves little)
    assert outs[1].outputs[0].token_ids != outs[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_presence_and_frequency_penalties_discourage_repeats(llm):
    prompt = "repeat after me"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    pen = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=2.0,
                                              presence_penalty=2.0), use_tqdm=False)
    b, p = base[0].outputs[0].token_ids, pen[0].outputs[0].token_ids
    assert len(set(b)) < len(b), "the plain greedy continuation repeats on this model"
    assert len(set(p)) == len(p), "strong presence/frequency penalties forbid repeats here"


def test_seeded_n4_reproducible_alone_and_in_a_batch(llm):
    sp = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=42, max_tokens=8, ignore_eos=True)
    alone = llm.generate("Tell me a story", sp, use_tqdm=False)[0]
    again = llm.generate("Tell me a story", sp, use_tqdm=False)[0]
    crowd = llm.generate(
        ["Other prompt", "Tell me a story", "Third"],
        [SamplingParams(temperature=1.0, max_tokens=5), sp, SamplingParams(temperature=0, max_tokens=9)],
        use_tqdm=False,
    )[1]
    samples = [c.token_ids for c in alone.outputs]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    assert samples == [c.token_ids for c in again.outputs] == [c.token_ids for c in crowd.outputs]
    assert len({tuple(s) for s in samples}) == 4, "the n samples differ from each other"
    unseeded = SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True)
    u1 = [c.token_ids for c in llm.generate("Tell me a story", unseeded, use_tqdm=False)[0].outputs]
    u2 = [c.token_ids for c in llm.generate("Tell me a story", unseeded, use_tqdm=False)[0].outputs]
    assert len({tuple(s) for s in u1}) == 4 and u1 != u2
    assert all(s not in samples for s in u1)
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=2, temperature=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-3), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["x"], detokenize=False), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={"x": 1.0}), "logit_bias"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_engine_rejects_out_of_vocab_ids_and_keeps_serving(llm):
    for kwargs, field in [
        (dict(allowed_token_ids=[49152]), "allowed_token_ids"),
        (dict(logit_bias={10**6: 1.0}), "logit_bias"),
        (dict(stop_token_ids=[49152]), "stop_token_ids"),
        (dict(logprobs=50), "logprobs"),
    ]:
        with pytest.raises(ValueError, match=field):
            llm.generate("hi", SamplingParams(**kwargs), use_tqdm=False)
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=3, allowed_token_ids=[100, 200]), use_tqdm=False)
    assert set(out[0].outputs[0].token_ids) <= {100, 200}
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


def test_detokenize_false_and_special_token_options(llm):
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=4, detokenize=False, logprobs=1), use_tqdm=False)
    c = out[0].outputs[0]
    assert c.text == "" and len(c.token_ids) == 4
    assert all(lp.decoded_token is None for e in c.logprobs for lp in e.values())
    eos_bias = {2: 100.0}  # always <|im_end|>, a special token
    keep = llm.generate("hi", SamplingParams(temperature=0, max_tokens=3, skip_special_tokens=False, ignore_eos=True,
                                             logit_bias=eos_bias), use_tqdm=False)[0].outputs[0]
    skip = llm.generate("hi", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias=eos_bias),
                        use_tqdm=False)[0].outputs[0]
    assert keep.token_ids == [2, 2, 2] and keep.text == "<|im_end|>" * 3
    assert skip.text == ""


def test_constraints_that_mask_every_token_mid_generation_fail_the_request(llm):
    """A ban the input check cannot see (a two-token bad word completed by the only allowed token)
    leaves no token at step two: the request ends with "error" instead of emitting token 0, its
    blocks come back, and a neighbour in the same batch is untouched."""
    tok = llm.get_tokenizer()
    the = tok.encode(" the", add_special_tokens=False)
    assert len(the) == 1
    trapped = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, allowed_token_ids=the, bad_words=["the the"])
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True, allowed_token_ids=the,
                             bad_words=["the the"])
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["hi", "hi", "hi"], [trapped, sampled, plain], use_tqdm=False)
    for out in outs[:2]:
        c = out.outputs[0]
        assert c.token_ids == the and c.finish_reason == "error", (c.token_ids, c.finish_reason)
        assert "masked every token" in c.stop_reason
    assert len(outs[2].outputs[0].token_ids) == 5 and outs[2].outputs[0].finish_reason == "length"
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks
