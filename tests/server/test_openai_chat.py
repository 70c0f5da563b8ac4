"""/v1/chat/completions through the official openai client against a real server process."""
from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from tests.server.conftest import MODEL_NAME, async_client, http

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_chat_greedy_equals_offline_llm_chat(client, reference_llm):
    ref = reference_llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert isinstance(resp.created, int) and resp.model == MODEL_NAME
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    # max_completion_tokens is the newer name of max_tokens
    short = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3,
                                           temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason in ("length", "stop")
    assert msg.content.startswith(short.choices[0].message.content)


def test_chat_stream_role_first_then_text_equal_to_non_streaming(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content and first.finish_reason is None
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(ch.usage is None for ch in body)
    assert all(ch.choices[0].delta.role is None for ch in body[1:])
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == full.choices[0].message.content
    reasons = [ch.choices[0].finish_reason for ch in body]
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_chat_n_stop_seed(client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=12, temperature=0.9, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:6]
    cut = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=12, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_top_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
    none = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=2, temperature=0)
    assert none.choices[0].logprobs is None
    # streamed logprobs cover the same tokens
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=1, stream=True))
    streamed = [t.token for ch in chunks[1:] if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_chat_async_client_and_content_parts(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]

    async def run():
        async with async_client(server) as c:
            a = await c.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=8, temperature=0)
            b = await c.chat.completions.create(
                model=MODEL_NAME, max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "What is the capital\nof France?"}],
            )
            return a, b

    a, b = asyncio.run(run())
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_tokenize_messages_matches_chat_usage(client, server):
    status, tok = http(server, "POST", "/tokenize", {"messages": MESSAGES[:2]})
    assert status == 200
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[:2], max_tokens=1, temperature=0)
    assert tok["count"] == len(tok["tokens"]) == resp.usage.prompt_tokens
    status, detok = http(server, "POST", "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and "What is the capital of France?" in detok["prompt"]
    assert "<|im_start|>assistant" in detok["prompt"]  # the generation prompt of the ChatML template


def test_multibyte_output_streams_whole_characters_and_logprob_bytes(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Repeat after me: 🎉🎉🎉"}], max_tokens=12,
              temperature=0)
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    text = full.choices[0].message.content
    assert "🎉" in text and "\ufffd" not in text
    # one emoji spans several byte-level tokens: their raw bytes, joined, spell the text
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens > len(text)
    if full.choices[0].finish_reason == "stop":  # the EOS token has an entry too (as in vLLM), not text
        content = content[:-1]
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8") == text
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    # completions, too
    cmpl = dict(model=MODEL_NAME, prompt="Emoji party: 🎉🎉🎉🎉", max_tokens=12, temperature=0)
    whole = client.completions.create(**cmpl).choices[0].text
    assert "🎉" in whole and "\ufffd" not in whole
    assert "".join(ch.choices[0].text for ch in client.completions.create(**cmpl, stream=True)) == whole
