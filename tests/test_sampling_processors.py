"""The sampler's logits processors against transformers' (or a direct formula), per row of one
mixed batch: greedy, random and penalised rows side by side, in one pass."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.sample.metadata import SamplingMetadata
from engine.sample.sampler import Sampler, apply_logits_processors
from engine.sampling_params import SamplingParams
from engine.worker.request_state import CachedRequestState

V = 49152
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path))


def make_state(params: SamplingParams, prompt: list[int], output: list[int], tokenizer=None, rid: str = "r"):
    params = params.clone()
    params.update_eos_token_ids({EOS})
    if tokenizer is not None:
        params.update_from_tokenizer(tokenizer, V)
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return CachedRequestState(rid, list(prompt), list(output), params, [], gen)


def reference_processed(logits: torch.Tensor, st: CachedRequestState) -> torch.Tensor:
    """vLLM's order, each step done by transformers' processor where one exists."""
    p = st.sampling_params
    x = logits.clone()[None]
    prompt, output = st.prompt_token_ids, st.output_token_ids
    if p.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[p.allowed_token_ids] = True
        x[0, ~keep] = float("-inf")
    if p.bad_words_token_ids:
        # vLLM matches bad words against the output only
        out_ids = torch.tensor([output], dtype=torch.int64) if output else torch.zeros((1, 0), dtype=torch.int64)
        x = NoBadWordsLogitsProcessor(p.bad_words_token_ids, eos_token_id=None)(out_ids, x)
    if p.min_tokens:
        ids = torch.tensor([prompt + output])
        x = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, sorted(p.all_stop_token_ids))(ids, x)
    if p.logit_bias:
        for t, b in p.logit_bias.items():
            x[0, t] += b
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), x)
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=V).float() if output else torch.zeros(V)
    x[0] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return x[0]


def reference_random(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then min_p, top-k, top-p (vLLM's order) with transformers' warpers."""
    x = TemperatureLogitsWarper(p.temperature)(None, logits.clone()[None])
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return x[0]


def mixed_batch(tokenizer):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (12,), generator=g).tolist()
    output = torch.randint(3, V, (6,), generator=g).tolist()
    output += output[:3]  # repeats, so frequency differs from presence
    hello = tokenizer.encode("hello world", add_special_tokens=False)
    rows = [
        (SamplingParams(temperature=0), prompt, output),
        (SamplingParams(temperature=0, repetition_penalty=1.7), prompt, output),
        (SamplingParams(temperature=0.8, presence_penalty=0.6, frequency_penalty=0.9, seed=3), prompt, output),
        (SamplingParams(temperature=0, logit_bias={output[0]: 7.5, 1234: -3.0, 99: 100.0}), prompt, output),
        (SamplingParams(temperature=0, bad_words=["hello world", "cat"]), prompt, output + hello[:-1]),
        (SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[17, 300],
                        allowed_token_ids=[2, 17, 300, 5000, 6000, 7000]), prompt, output[:1]),
        (SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[17]), prompt, output[:2]),
        (SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=0.8,
                        presence_penalty=-0.5, frequency_penalty=1.1, logit_bias={output[1]: 2.0}), prompt, output),
        (SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=2.0), prompt[:3], []),
    ]
    return [make_state(p, pr, out, tokenizer, f"r{i}") for i, (p, pr, out) in enumerate(rows)]


def test_each_row_of_a_mixed_batch_matches_the_reference(tokenizer):
    torch.manual_seed(0)
    states = mixed_batch(tokenizer)
    logits = torch.randn(len(states), V) * 3
    # make some prompt/output tokens the top candidates so penalties and bans change the argmax
    for i, st in enumerate(states):
        for t in (st.prompt_token_ids[:2] + st.output_token_ids[:2]):
            logits[i, t] += 12.0
    meta = SamplingMetadata.build(states, V, torch.device("cpu"))
    processed = apply_logits_processors(logits.clone(), meta)
    for i, st in enumerate(states):
        ref = reference_processed(logits[i], st)
        assert torch.equal(torch.isinf(processed[i]), torch.isinf(ref)), f"row {i}: -inf masks differ"
        fin = torch.isfinite(ref)
        torch.testing.assert_close(processed[i][fin], ref[fin], atol=1e-5, rtol=1e-5, msg=f"row {i}")
    assert torch.equal(processed[0], logits[0]), "a row without options must be untouched"

    tokens = Sampler()(logits.clone(), meta).token_ids
    for i, st in enumerate(states):
        if st.sampling_params.is_greedy:
            assert tokens[i] == reference_processed(logits[i], st).argmax(), f"greedy row {i}"
    # the options really changed something in each row that uses them
    for i in (1, 3, 4, 6, 8):
        if i == 6:
            continue  # min_tokens already reached: nothing to change
        assert not torch.equal(processed[i], logits[i]), f"row {i} unchanged"
    assert processed[6].isinf().sum() == 0
    allowed = states[5].sampling_params.allowed_token_ids
    finite5 = torch.isfinite(processed[5]).nonzero().flatten().tolist()
    assert sorted(finite5) == sorted(set(allowed) - {2, 17, 300}), "allowed ids minus suppressed stop/EOS ids"
    assert tokens[5].item() in {5000, 6000, 7000}


TOP_K_ONLY = [  # the top-k path without a sort, rows with and without top-k
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=0.8, top_k=3),
    SamplingParams(temperature=0),
]
MIXED_FILTERS = [
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=0.9, top_p=0.6),
    SamplingParams(temperature=0.7, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=200, top_p=0.8, min_p=0.02),
]


@pytest.mark.parametrize("scale", [1.5, 8.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("params", [MIXED_FILTERS, TOP_K_ONLY], ids=["mixed", "top_k_only"])
def test_random_rows_filters_match_transformers_warpers(params, scale):
    torch.manual_seed(1)
    states = [make_state(p, [5], [], rid=f"r{i}") for i, p in enumerate(params)]
    # flat: each filter's boundary falls among many tokens, so an off-by-a-bit filter shows, and
    # top-p needs its full sort; peaked: the nucleus lies in the top candidates (no sort)
    logits = torch.randn(len(states), V) * scale
    meta = SamplingMetadata.build(states, V, torch.device("cpu"))
    out = Sampler.random_logits(logits.clone(), meta)
    rand_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    assert out.shape[0] == len(rand_rows), "greedy rows skip the random path"
    for j, i in enumerate(rand_rows):
        ref = reference_random(logits[i], params[i])
        assert torch.equal(torch.isfinite(out[j]), torch.isfinite(ref)), f"row {i}: kept sets differ"
        fin = torch.isfinite(ref)
        torch.testing.assert_close(out[j][fin], ref[fin], atol=1e-5, rtol=1e-5)
    # the filters keep what they should: top-k exactly k, top-p/min-p strictly fewer than vocab
    for j, i in enumerate(rand_rows):
        kept = int(torch.isfinite(out[j]).sum())
        p = params[i]
        if p.top_k and p.top_p == 1.0 and p.min_p == 0.0:
            assert kept == p.top_k
        elif p.top_k or p.top_p < 1.0 or p.min_p > 0.0:
            assert 1 <= kept < V
        else:
            assert kept == V


def test_unused_options_cost_nothing():
    states = [make_state(SamplingParams(temperature=0), [1, 2, 3], [4], rid=f"r{i}") for i in range(4)]
    meta = SamplingMetadata.build(states, V, torch.device("cpu"))
    assert meta.all_greedy and meta.random_rows is None and meta.temperature is None
    for name in ("top_p", "top_k", "min_p", "allowed_rows", "banned_rows", "bias_rows", "penalties", "max_num_logprobs"):
        assert getattr(meta, name) is None, name
    assert all(s.penalty is None for s in states), "no penalty state is built for requests without penalties"
    mixed = states[:2] + [make_state(SamplingParams(temperature=1.0, top_p=0.5), [1], [], rid="x")]
    meta = SamplingMetadata.build(mixed, V, torch.device("cpu"))
    assert meta.random_rows.tolist() == [2] and meta.top_p.tolist() == [0.5] and meta.top_k is None


def test_bad_words_follow_vllms_rule(tokenizer):
    p = make_state(SamplingParams(bad_words=["hello world", " cat"]), [5], [], tokenizer).sampling_params
    seqs = p.bad_words_token_ids
    assert tokenizer.encode("hello world", add_special_tokens=False) in seqs
    assert tokenizer.encode(" hello world", add_special_tokens=False) in seqs
    assert tokenizer.encode("cat", add_special_tokens=False) in seqs  # leading space stripped, then both forms
    hello = tokenizer.encode(" hello world", add_special_tokens=False)
    assert len(hello) == 2

    def banned(output):
        st = make_state(SamplingParams(temperature=0, bad_words=["hello world", " cat"]), [5], output, tokenizer)
        meta = SamplingMetadata.build([st], V, torch.device("cpu"))
        return set(meta.banned_tokens.tolist()) if meta.banned_tokens is not None else set()

    single = {s[0] for s in seqs if len(s) == 1}
    assert banned([]) == single, "only single-token words are banned before any prefix appears"
    assert hello[1] in banned([7, hello[0]]), "the word's last token is banned right after its prefix"
    assert hello[1] not in banned([hello[0], 7])


def test_seeded_rows_ignore_the_batch_and_survive_rebuilds():
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    sp = SamplingParams(temperature=1.0, seed=1234)

    def draw(states, row):
        meta = SamplingMetadata.build(states, V, torch.device("cpu"))
        lg = logits.expand(len(states), V).clone()
        return Sampler()(lg, meta).token_ids[row].item()

    alone = make_state(sp, [1], [], rid="a")
    seq_alone = []
    for _ in range(3):
        seq_alone.append(draw([alone], 0))
        alone.output_token_ids.append(seq_alone[-1])
    batched = make_state(sp, [1], [], rid="b")
    others = [make_state(SamplingParams(temperature=1.0), [1], [], rid="u"), make_state(SamplingParams(temperature=0), [1], [], rid="g")]
    seq_batched = []
    for _ in range(3):
        seq_batched.append(draw([others[0], batched, others[1]], 1))
        batched.output_token_ids.append(seq_batched[-1])
    assert seq_alone == seq_batched
    # a request rebuilt after preemption (fresh generator, two outputs already) continues the stream
    rebuilt = make_state(sp, [1], seq_alone[:2], rid="c")
    assert draw([rebuilt], 0) == seq_alone[2]


def test_logprobs_are_raw_and_ranked():
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 2
    params = [SamplingParams(temperature=0, logprobs=5, repetition_penalty=2.0),
              SamplingParams(temperature=1.0, logprobs=0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0)]
    states = [make_state(p, [1, 2], [3], rid=f"r{i}") for i, p in enumerate(params)]
    meta = SamplingMetadata.build(states, V, torch.device("cpu"))
    out = Sampler()(logits.clone(), meta)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[1] == 7
    for i in range(3):
        tok = out.token_ids[i]
        assert out.logprob_token_ids[i, 0] == tok
        torch.testing.assert_close(out.logprobs[i, 0], ref[i, tok], atol=1e-5, rtol=0)
        assert out.logprob_ranks[i] == (ref[i] > ref[i, tok]).sum() + 1
        vals, ids = ref[i].topk(5)
        assert out.logprob_token_ids[i, 1:].tolist() == ids.tolist()
        torch.testing.assert_close(out.logprobs[i, 1:], vals, atol=1e-5, rtol=0)


def test_top_p_candidate_path_equals_the_full_sort():
    from engine.sample.sampler import TOP_P_CANDIDATES, _top_p_by_sort, apply_top_p

    torch.manual_seed(2)
    top_p = torch.tensor([0.5, 0.9, 1.0, 0.95, 0.3, 0.999])
    for scale in (0.5, 3.0, 10.0):
        logits = torch.randn(len(top_p), V) * scale
        logits[1, :100] = float("-inf")
        fast = apply_top_p(logits, top_p)
        ref = _top_p_by_sort(logits, top_p)
        assert torch.equal(fast.isinf(), ref.isinf()), f"scale {scale}"
        assert torch.equal(fast[~fast.isinf()], logits[~fast.isinf()])
        if scale == 10.0:  # the candidate path really ran for the top-p rows
            mass = logits.softmax(-1).topk(TOP_P_CANDIDATES).values.sum(-1)
            assert bool((mass >= top_p)[top_p < 1].all())
