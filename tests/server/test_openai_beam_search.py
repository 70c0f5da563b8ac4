"""use_beam_search on /v1/completions and /v1/chat/completions (vLLM's extra field, n = width):
the same beams as the offline LLM.beam_search, and 400s for what beam search cannot honour."""
from __future__ import annotations

import pytest

from engine.entrypoints.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from tests.server.conftest import MODEL_NAME, http

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


def test_completions_beams_equal_offline(server, reference_llm):
    status, out = http(server, "POST", "/v1/completions", {
        "model": MODEL_NAME, "prompt": PROMPTS, "max_tokens": 8, "n": 3, "use_beam_search": True, "temperature": 0,
    })
    assert status == 200, out
    ref = reference_llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=8))
    tok = reference_llm.get_tokenizer()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for c in out["choices"]:
        p, j = divmod(c["index"], 3)
        beam = ref[p].sequences[j]
        assert c["text"] == beam.text and c["finish_reason"] == beam.finish_reason
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    completion_tokens = sum(len(s.tokens) - len(tok.encode(p)) for p, r in zip(PROMPTS, ref) for s in r.sequences)
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}


def test_chat_beams_equal_offline(server, reference_llm):
    messages = [{"role": "user", "content": "Name a prime number."}]
    status, out = http(server, "POST", "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": messages, "max_tokens": 8, "n": 2, "use_beam_search": True,
    })
    assert status == 200, out
    ids = reference_llm.apply_chat_template(messages)
    ref = reference_llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=8))[0]
    assert [c["message"]["content"] for c in out["choices"]] == [s.text for s in ref.sequences]
    assert [c["index"] for c in out["choices"]] == [0, 1]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": MAX_BEAM_WIDTH + 1}, "n"),
        ({"n": 0}, "n"),
        ({"stream": True}, "stream"),
        ({"logprobs": 2}, "logprobs"),
        ({"temperature": 0.5}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
        ({"stop": ["x"]}, "stop"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"length_penalty": "long"}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
    ],
)
def test_unsupported_combinations_are_400(server, extra, param):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "n": 2, "use_beam_search": True, **extra}
    status, out = http(server, "POST", "/v1/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == param, out


def test_chat_rejects_stream_and_logprobs(server):
    base = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
            "use_beam_search": True}
    for extra, param in (({"stream": True}, "stream"), ({"logprobs": True}, "logprobs")):
        status, out = http(server, "POST", "/v1/chat/completions", {**base, **extra})
        assert status == 400 and out["error"]["param"] == param, out
