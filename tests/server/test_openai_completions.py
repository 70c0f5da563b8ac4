"""/v1/completions through the official openai client against a real server process."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine.sampling_params import SamplingParams
from tests.server.conftest import MODEL_NAME, async_client, tokenize

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]


def _check_envelope(resp, n_choices: int) -> None:
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert isinstance(resp.created, int) and abs(resp.created - time.time()) < 600
    assert resp.model == MODEL_NAME
    assert [c.index for c in resp.choices] == list(range(n_choices))


def test_greedy_equals_offline_llm(client, reference_llm):
    ref = reference_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    for prompt, r in zip(PROMPTS, ref):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
        _check_envelope(resp, 1)
        c = resp.choices[0]
        assert c.text == r.outputs[0].text
        assert c.finish_reason == r.outputs[0].finish_reason
        assert resp.usage.prompt_tokens == len(r.prompt_token_ids)
        assert resp.usage.completion_tokens == len(r.outputs[0].token_ids)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_text_equals_non_streaming(client):
    for prompt in PROMPTS:
        full = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True))
        assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
        assert all(ch.usage is None for ch in chunks)  # not asked for
        text = "".join(ch.choices[0].text for ch in chunks)
        assert text == full.choices[0].text
        reasons = [ch.choices[0].finish_reason for ch in chunks]
        assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_stream_include_usage_and_n_indices(client, server):
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=["One, two,", "Red, green,"], n=2, max_tokens=6, temperature=0.8, seed=3,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(ch.usage is None for ch in body)
    finishes = {}
    for ch in body:
        for c in ch.choices:
            assert c.index not in finishes, "a choice got a chunk after its finish_reason"
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert sorted(finishes) == [0, 1, 2, 3]
    assert set(finishes.values()) == {"length"}
    assert last.usage.completion_tokens == 4 * 6
    assert last.usage.prompt_tokens == len(tokenize(server, "One, two,")) + len(tokenize(server, "Red, green,"))


def test_prompt_forms_and_indices(client, server):
    ids = tokenize(server, "The sky is")
    by_text = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)

    many = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:2]], max_tokens=4, temperature=0.8,
                                     seed=5, n=3, extra_body={"ignore_eos": True})
    _check_envelope(many, 6)
    # index = prompt_index * n + sample_index; n samples of each prompt, prompt tokens counted once
    assert many.usage.prompt_tokens == len(ids) + 2
    assert many.usage.completion_tokens == 6 * 4
    again = client.completions.create(model=MODEL_NAME, prompt=ids[:2], max_tokens=4, temperature=0.8, seed=5,
                                      n=3, extra_body={"ignore_eos": True})
    # the same seed gives the same samples, whichever position the prompt had
    assert [c.text for c in again.choices] == [c.text for c in many.choices[3:]]

    strs = client.completions.create(model=MODEL_NAME, prompt=["The sky is", "Hello"], max_tokens=4, temperature=0)
    assert strs.choices[0].text.startswith(by_text.choices[0].text[:3])
    assert [c.index for c in strs.choices] == [0, 1]


def test_logprobs_and_echo(client):
    resp = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=5, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == pytest.approx(tlp)
        assert tlp == pytest.approx(max(top.values()))  # greedy picks the most likely token

    echo = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=5, temperature=0,
                                     echo=True, logprobs=1)
    c = echo.choices[0]
    assert c.text == "The sky is" + resp.choices[0].text
    n_prompt = echo.usage.prompt_tokens
    assert len(c.logprobs.tokens) == n_prompt + 5
    assert c.logprobs.token_logprobs[0] is None  # nothing predicts the first prompt token
    assert all(isinstance(x, float) for x in c.logprobs.token_logprobs[1:])
    assert "".join(c.logprobs.tokens) == c.text


def test_stop_string_across_token_boundary(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=24, temperature=0,
                                     logprobs=0)
    text, tokens = base.choices[0].text, base.choices[0].logprobs.tokens
    assert "".join(tokens) == text
    # a stop string made of the last char of token k and the first char of token k+1, where it
    # first occurs at that boundary
    candidates = []
    for k in range(1, len(tokens) - 1):
        boundary = sum(len(t) for t in tokens[: k + 1])
        stop = text[boundary - 1 : boundary + 1]
        if len(tokens[k]) and len(tokens[k + 1]) and len(stop) == 2 and text.find(stop) == boundary - 1:
            candidates.append((boundary, stop))
    assert candidates, f"no token boundary to cut in {tokens}"
    boundary, stop = candidates[0]
    want = text[: boundary - 1]
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=24, temperature=0,
                                     stop=[stop, "zzzz-never"])
    assert resp.choices[0].text == want and resp.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=24,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_fields_reach_the_engine(client, server):
    # logit_bias forces a token; frequency_penalty breaks a repetition; ignore_eos runs to max_tokens
    forced = tokenize(server, " banana")
    assert len(forced) == 1
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0,
                                  logit_bias={str(forced[0]): 100})
    assert r.choices[0].text == " banana" * 3

    rep = "1 1 1 1 1 1 1 1"
    plain = client.completions.create(model=MODEL_NAME, prompt=rep, max_tokens=8, temperature=0)
    assert plain.choices[0].text.strip().startswith("1 1")
    pen = client.completions.create(model=MODEL_NAME, prompt=rep, max_tokens=8, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0,
                                    extra_body={"repetition_penalty": 1.5})
    assert pen.choices[0].text != plain.choices[0].text

    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=7, temperature=1.0, top_p=0.9,
                                  seed=1, extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_seeds_reproducible_under_concurrent_load(server):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=1234)

    async def run() -> tuple[str, list[str], str]:
        async with async_client(server) as c:
            alone = (await c.completions.create(**kw)).choices[0].text
            noise = [
                c.completions.create(model=MODEL_NAME, prompt=f"Story number {i}:", max_tokens=16, temperature=1.0)
                for i in range(6)
            ]
            results = await asyncio.gather(*noise, c.completions.create(**kw), c.completions.create(**kw))
            other_seed = (await c.completions.create(**{**kw, "seed": 99})).choices[0].text
            return alone, [r.choices[0].text for r in results[-2:]], other_seed

    alone, loaded, other = asyncio.run(run())
    assert loaded == [alone, alone]
    assert other != alone


def test_32_concurrent_streams_all_finish(server):
    async def one(c, i: int) -> tuple[str, str | None, int]:
        stream = await c.completions.create(
            model=MODEL_NAME, prompt=f"Count to ten, attempt {i}:", max_tokens=12, temperature=0.7, seed=i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            else:
                usage = ch.usage
        return text, finish, usage.completion_tokens

    async def run():
        async with async_client(server) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(32))), timeout=240)

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(finish == "length" and n == 12 and text for text, finish, n in results)
