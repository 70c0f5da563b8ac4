"""Stop strings matched on text across token boundaries, stop token ids, min_tokens, and the
finish_reason / stop_reason of each case; streamed deltas hold back a possible stop's start."""
from __future__ import annotations

import pytest

from engine.core.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path))


def run_detok(tokenizer, text: str, **params):
    """Feeds ``text``'s tokens one per step. Returns (detokenizer, stop, tokens consumed)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"), SamplingParams(**params))
    for n, t in enumerate(ids, start=1):
        stop = d.update([t])
        if stop is not None:
            return d, stop, n
    return d, None, len(ids)


def test_stop_split_across_tokens(tokenizer):
    # "Hello" | " world": the stop "o w" spans the boundary
    d, stop, n = run_detok(tokenizer, "Hello world, this is a test", stop=["o w"])
    assert (stop, d.output_text, n) == ("o w", "Hell", 2)
    d, stop, _ = run_detok(tokenizer, "Hello world, this is a test", stop=["o w"], include_stop_str_in_output=True)
    assert d.output_text == "Hello w"


def test_stop_spanning_multibyte_characters(tokenizer):
    text = "Ünïcödé façade 日本語 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 6, "the CJK characters must be split over byte tokens"
    d, stop, n = run_detok(tokenizer, text, stop=["本語"])
    assert stop == "本語" and d.output_text == "Ünïcödé façade 日"
    assert tokenizer.decode(ids[:n]).endswith("本語"), "stops at the token that completes the character"
    # a stop that is one multi-byte character at the very first token, itself split over two byte tokens
    d, stop, n = run_detok(tokenizer, text, stop=["Ü"])
    assert (stop, d.output_text, n) == ("Ü", "", 2)


def test_several_stops_earliest_wins(tokenizer):
    d, stop, _ = run_detok(tokenizer, "Hello world, this is a test", stop=["world", "o w", "zzz"])
    assert (stop, d.output_text) == ("o w", "Hell")
    d, stop, _ = run_detok(tokenizer, "Hello world, this is a test", stop=["zzz", "is a", "this"])
    assert (stop, d.output_text) == ("this", "Hello world, ")


def test_stop_at_first_token_and_min_tokens(tokenizer):
    d, stop, n = run_detok(tokenizer, "Hello world", stop=["He"])
    assert (stop, d.output_text, n) == ("He", "", 1)
    # vLLM honours stop strings only once more than min_tokens tokens exist
    d, stop, n = run_detok(tokenizer, "Hello world, Hello again", stop=["Hello"], min_tokens=1)
    assert (stop, d.output_text) == ("Hello", "Hello world, ")


def test_eos_text_excluded_unless_asked(tokenizer):
    for include, expected in ((False, "Hi"), (True, "Hi<|im_end|>")):
        d = IncrementalDetokenizer(
            tokenizer, [1], SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        )
        d.update(tokenizer.encode("Hi", add_special_tokens=False))
        d.update([EOS], stop_terminated=True)
        assert d.output_text == expected


def test_deltas_hold_back_possible_stop_starts(tokenizer):
    text = "Hello world, this is a test of streaming"
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=["zzzz", "is a tesT"]))
    sent = ""
    for t in ids:
        d.update([t])
        sent += d.get_delta(finished=False)
        assert len(sent) <= max(len(d.output_text) - 8, 0), "the last len(longest stop) - 1 chars are held"
        assert d.get_text(finished=False) == sent
    sent += d.get_delta(finished=True)
    assert sent == d.output_text == text


# ---- end to end on the tiny model ------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_model_path):
    from engine.entrypoints.llm import LLM

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=128, seed=0)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def greedy(llm):
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None
    return out


def token_ends(tok, ids: list[int]) -> list[int]:
    return [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]


def test_engine_stop_string_across_boundary(llm, greedy):
    tok = llm.get_tokenizer()
    text, ids = greedy.text, greedy.token_ids
    ends = token_ends(tok, ids)
    # a stop straddling a token boundary (after the 2nd token or later), first occurring there
    b = next(e for e in ends[1:-2] if e >= 2 and text.find(text[e - 2 : e + 2]) == e - 2 and len(text[e - 2 : e + 2]) == 4)
    stop = text[b - 2 : b + 2]
    k = next(i for i, e in enumerate(ends) if e >= b + 2) + 1
    params = [SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=16)]
    outs = llm.generate(["Once upon a time"] * 3, params, use_tqdm=False)
    a, inc, plain = (o.outputs[0] for o in outs)
    assert (a.text, a.finish_reason, a.stop_reason) == (text[: b - 2], "stop", stop)
    assert a.token_ids == ids[:k]
    assert inc.text == text[: b + 2] and inc.finish_reason == "stop"
    assert plain.text == text and plain.finish_reason == "length"
    # the stop completes exactly at max_tokens: "stop" wins over "length"
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=k, stop=[stop]), use_tqdm=False)
    assert (out[0].outputs[0].finish_reason, out[0].outputs[0].stop_reason) == ("stop", stop)


def test_engine_stop_token_ids_and_first_token_stop(llm, greedy):
    tok = llm.get_tokenizer()
    ids = greedy.token_ids
    j = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ids[j]]),
                       use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (ids[: j + 1], "stop", ids[j])
    assert out.text == tok.decode(ids[:j]), "the stop token's text is not in the output"
    first_char = greedy.text[:1]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16, stop=[first_char]),
                       use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason, len(out.token_ids)) == ("", "stop", first_char, 1)


def test_engine_min_tokens_suppresses_eos_and_stop_ids(llm, greedy):
    force_eos = {EOS: 100.0}
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=10, logit_bias=force_eos), use_tqdm=False)
    assert (out[0].outputs[0].token_ids, out[0].outputs[0].finish_reason) == ([EOS], "stop")
    assert out[0].outputs[0].stop_reason is None
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=10, min_tokens=3, logit_bias=force_eos),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:3]
    assert out.finish_reason == "stop" and out.stop_reason is None
    # a stop token id is suppressed too, then honoured
    first = greedy.token_ids[0]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=6, min_tokens=2,
                       stop_token_ids=[first], logit_bias={first: 50.0}), use_tqdm=False)[0].outputs[0]
    assert first not in out.token_ids[:2] and out.token_ids[2] == first
    assert (len(out.token_ids), out.finish_reason, out.stop_reason) == (3, "stop", first)
    # ignore_eos: EOS is an ordinary token
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias=force_eos),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] * 5 and out.finish_reason == "length"
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


def test_engine_streaming_deltas_join_to_final_text(llm, greedy):
    engine = llm.llm_engine
    stop = greedy.text[-6:-2]
    engine.add_request("s1", "Once upon a time", SamplingParams(temperature=0, max_tokens=16, stop=[stop]), delta=True)
    pieces, final = [], None
    for _ in range(64):
        for out in engine.step():
            c = out.outputs[0]
            pieces.append(c.text)
            if out.finished:
                final = c
        if final is not None:
            break
    expected = greedy.text[: greedy.text.find(stop)]
    assert "".join(pieces) == expected and final.finish_reason == "stop" and final.stop_reason == stop


# ---- property: streamed deltas, final text and stops agree for any text and stops ------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ALPHABET = st.sampled_from(list("ab ,.\n") + ["é", "日", "本", "🙂", "€"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(_ALPHABET, min_size=1, max_size=30),
    stops=st.lists(st.text(_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_and_delta_properties(tokenizer, text, stops, include):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    d = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=stops, include_stop_str_in_output=include))
    streamed, stop = "", None
    for t in ids:
        stop = d.update([t])
        if stop is not None:
            break
        streamed += d.get_delta(finished=False)
    streamed += d.get_delta(finished=True)
    out = d.output_text
    assert streamed == out, "the deltas add up to the final text"
    assert full.startswith(out)
    if stop is None:
        assert out == full and not any(s in full for s in stops)
    else:
        body = out[: len(out) - len(stop)] if include else out
        assert not include or out.endswith(stop)
        assert full.startswith(body + stop), "the text is cut right before the matched stop"
        assert not any(s in body + stop[:-1] for s in stops), "no stop string ends earlier"
