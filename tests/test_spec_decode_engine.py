"""Speculative decoding inside the engine, on tiny random Llamas: greedy output identical to no
speculation under batching, chunked prefill, preemption (recompute and swap), prefix caching, stop
conditions and logprobs; sampled output with the target's exact law (chi-square); all KV blocks
returned; statistics exported."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.llm_engine import LLMEngine
from engine.config import EngineArgs
from tests.conftest import make_tiny_llama

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models do many tiny ops: one thread avoids OpenMP barrier stalls on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory, tiny_model_path):
    """The tiny target with noise on its weights: a draft that agrees with it only part of the time."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-draft")
    for f in tiny_model_path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(tiny_model_path / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    noisy = {k: (v + 0.003 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v).contiguous() for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model_path):
    """Repetitive and plain prompts of several lengths (so proposals are sometimes right)."""
    g = torch.Generator().manual_seed(0)
    rand = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (5, 23, 40, 70)]
    loop = [11, 12, 13, 14, 15] * 6
    return rand + [loop, rand[1] + rand[1][:9], list(range(300, 317))]


def _spec_configs(draft_path):
    return {
        "ngram": NGRAM,
        "draft": {"method": "draft_model", "model": str(draft_path), "num_speculative_tokens": 4},
    }


def _gen(llm: LLM, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_free(llm: LLM):
    s = llm.get_stats()
    assert s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["kv_host_blocks_free"] == s["kv_host_blocks_total"]
    llm.llm_engine.kv_cache.check_invariants()


@pytest.fixture(scope="module")
def reference(tiny_model_path, prompts):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256)
    return _tokens(_gen(llm, prompts))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(max_num_batched_tokens=16),  # chunked prefill, and proposals cut by the token budget
        dict(num_gpu_blocks_override=14, block_size=8),  # preemption by recompute
        dict(num_gpu_blocks_override=14, block_size=8, preemption_mode="swap", swap_space=0.01),
    ],
    ids=["batched", "chunked", "recompute", "swap"],
)
def test_greedy_identical(tiny_model_path, draft_path, prompts, reference, method, setting):
    args = dict(num_gpu_blocks_override=256, enable_prefix_caching=False) | setting
    llm = LLM(str(tiny_model_path), speculative_config=_spec_configs(draft_path)[method], **args)
    outs = _gen(llm, prompts)
    assert _tokens(outs) == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    s = llm.get_stats()
    assert 0 < s["spec_num_accepted_tokens"] < s["spec_num_draft_tokens"], s  # accepts and rejects both happen
    if "num_gpu_blocks_override" in setting:
        assert s["scheduler_num_preemptions"] > 0
    _assert_free(llm)


def test_one_at_a_time_and_prefix_caching(tiny_model_path, draft_path, prompts, reference):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256, speculative_config=_spec_configs(draft_path)["draft"])
    one = [_tokens(_gen(llm, [p]))[0] for p in prompts]
    again = _tokens(_gen(llm, prompts))  # the same prompts: served from the prefix cache
    assert one == reference and again == reference
    assert llm.get_stats()["prefix_cache_hits"] > 0
    _assert_free(llm)


def test_draft_matching_target_accepts_everything(tiny_model_path, prompts, reference):
    """With the target itself as the draft every proposal is right: the draft's cache is kept in
    step with the target's tokens across steps (a stale draft K/V would cost acceptances)."""
    spec = {"method": "draft_model", "model": str(tiny_model_path), "num_speculative_tokens": 3}
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256, speculative_config=spec)
    assert _tokens(_gen(llm, prompts)) == reference
    s = llm.get_stats()
    assert s["spec_acceptance_rate"] == 1.0 and s["spec_mean_accepted_length"] > 3.5, s
    # 24 tokens in about 24 / 4 verifying steps per request (plus prefill), not 24
    assert s["scheduler_num_steps"] <= 10, s


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_stops_max_tokens_and_logprobs(tiny_model_path, draft_path, prompts, reference, method):
    base = LLM(str(tiny_model_path), num_gpu_blocks_override=256)
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256, speculative_config=_spec_configs(draft_path)[method])
    # a stop token id in the middle of each reference output, odd max_tokens, a stop string, logprobs
    text = _gen(base, prompts[4:5])[0].outputs[0].text
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[ref[10]], logprobs=2)
        for ref in reference
    ] + [
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[text[len(text) // 2 : len(text) // 2 + 3]]),
        # options whose effect depends on the output so far: each verified position sees the
        # output extended by the proposals before it
        SamplingParams(temperature=0.0, max_tokens=24, min_tokens=12, stop_token_ids=[reference[4][2]]),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5),
    ]
    ps = prompts + prompts[4:5] * 4
    want, got = _gen(base, ps, params), _gen(llm, ps, params)
    for w, g in zip(want, got):
        a, b = w.outputs[0], g.outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason, a.stop_reason)
        assert len(b.logprobs or []) == len(a.logprobs or [])
        for la, lb in zip(a.logprobs or [], b.logprobs or []):
            assert la.keys() == lb.keys()
            for t in la:
                assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4) and lb[t].rank == la[t].rank
    assert got[len(prompts)].outputs[0].finish_reason == "length" and len(got[len(prompts)].outputs[0].token_ids) == 7
    assert got[len(prompts) + 1].outputs[0].finish_reason == "stop"
    assert len(got[len(prompts) + 2].outputs[0].token_ids) >= 12
    assert llm.get_stats()["spec_num_accepted_tokens"] > 0
    _assert_free(llm)


def test_streaming_gets_several_tokens_per_step(tiny_model_path, prompts, reference):
    spec = {"method": "draft_model", "model": str(tiny_model_path), "num_speculative_tokens": 3}
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_path), num_gpu_blocks_override=64, speculative_config=spec))
    engine.add_request("s", {"prompt_token_ids": prompts[0]}, GREEDY, delta=True)
    chunks = []
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        chunks += [o.outputs[0].token_ids for o in engine.step()]
    assert [t for c in chunks for t in c] == reference[0]
    assert max(len(c) for c in chunks) == 4  # 3 accepted proposals + the bonus token in one chunk
    stats = engine.get_stats()
    for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_mean_accepted_length"):
        assert key in stats


def test_no_speculation_stats_are_zero(tiny_model_path):
    s = LLM(str(tiny_model_path), num_gpu_blocks_override=16).get_stats()
    assert s["spec_num_draft_tokens"] == 0 and s["spec_mean_accepted_length"] == 0.0


def test_bad_speculative_config_is_a_value_error(tiny_model_path):
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens"):
        LLM(str(tiny_model_path), speculative_config={"method": "ngram", "num_speculative_tokens": -1})
    with pytest.raises(ValueError, match="speculative_config.model"):
        LLM(str(tiny_model_path), speculative_config={"method": "draft_model", "num_speculative_tokens": 2, "model": "/no/such/dir"})


# ---- the sampled law ---------------------------------------------------------------------------
TOP_K, TEMP, N_SAMPLES = 3, 0.9, 1000


def _exact_law(model_path, prompt):
    """P(t1, t2, t3) under temperature TEMP and top-k TOP_K, from transformers' logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def dist(ids):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].float() / TEMP
        vals, idx = logits.topk(TOP_K)
        return dict(zip(idx.tolist(), vals.softmax(-1).tolist()))

    law = {}
    for a, pa in dist(prompt).items():
        for b, pb in dist(prompt + [a]).items():
            for c, pc in dist(prompt + [a, b]).items():
                law[(a, b, c)] = pa * pb * pc
    return law


def _pvalue(counts: dict, law: dict) -> float:
    """Pearson's chi-square over the 27 triples, pooling those expected fewer than 5 times."""
    if any(k not in law for k in counts):
        return 0.0
    n = sum(counts.values())
    big = [k for k in law if law[k] * n >= 5]
    small = [k for k in law if law[k] * n < 5]
    obs = [counts.get(k, 0) for k in big] + ([sum(counts.get(k, 0) for k in small)] if small else [])
    exp = [law[k] * n for k in big] + ([sum(law[k] for k in small) * n] if small else [])
    obs_t, exp_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    chi2 = ((obs_t - exp_t) ** 2 / exp_t).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), chi2 / 2))


def _sample_counts(llm: LLM, prompt):
    params = SamplingParams(temperature=TEMP, top_k=TOP_K, max_tokens=4, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * N_SAMPLES, params, use_tqdm=False)
    counts: dict = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids[:3])
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.fixture(scope="module")
def law_prompt(tiny_model_path, reference, prompts):
    # the target's own greedy continuation, repeated: n-gram proposals are then often likely
    return prompts[0] + reference[0][:12] + prompts[0] + reference[0][:1]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_law_matches_target(tiny_model_path, draft_path, law_prompt, method):
    law = _exact_law(tiny_model_path, law_prompt)
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=512, speculative_config=_spec_configs(draft_path)[method])
    counts = _sample_counts(llm, law_prompt)
    s = llm.get_stats()
    # both acceptance and resampling are exercised, many times over (n-gram drafts here: about 105 of
    # some 1,370 proposals accepted, a binomial count whose spread is +-10, so the bar sits well below)
    assert s["spec_num_accepted_tokens"] > 50 and s["spec_acceptance_rate"] < 0.9, s
    assert _pvalue(counts, law) > 1e-3, (counts, law)
    _assert_free(llm)


def test_sampled_law_test_rejects_a_wrong_rule(tiny_model_path, law_prompt, monkeypatch):
    """Power: accepting every proposal (a plausible bug) fails the same test."""
    import engine.spec_decode.verify as verify

    def always_accept(batch, probs):
        out = []
        for s, d in zip(batch.row_starts(), batch.draft_token_ids):
            out.append(d + [int(torch.multinomial(probs[s + len(d)], 1))])
        return out

    monkeypatch.setattr(verify, "random_verify", always_accept)
    law = _exact_law(tiny_model_path, law_prompt)
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=512, speculative_config=NGRAM)
    counts = _sample_counts(llm, law_prompt)
    assert _pvalue(counts, law) < 1e-3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_n_samples_seeded_reproducible(tiny_model_path, draft_path, prompts, method):
    """n > 1 samples share their prompt's blocks (the draft must not write into a shared block
    past the shared prompt); seeded sampling with speculation is reproducible run to run."""
    spec = _spec_configs(draft_path)[method]
    params = SamplingParams(n=3, temperature=0.8, top_k=5, max_tokens=12, ignore_eos=True, seed=11)

    def run():
        llm = LLM(str(tiny_model_path), num_gpu_blocks_override=128, speculative_config=spec)
        outs = _gen(llm, prompts[4:6], params)
        _assert_free(llm)
        return [[c.token_ids for c in o.outputs] for o in outs], llm.get_stats()

    (a, stats), (b, _) = run(), run()
    assert a == b and all(len(t) == 12 for o in a for t in o)
    assert stats["scheduler_num_forked_samples"] > 0 and stats["spec_num_accepted_tokens"] > 0, stats
