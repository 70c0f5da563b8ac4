"""Structured outputs through a real server and the official openai client: response_format (json_schema,
json_object), vLLM's structured_outputs extra field, ``client.chat.completions.parse`` with a pydantic
model, streaming, and 400s naming the field for constraints that cannot compile."""
from __future__ import annotations

import json
import re

import pytest

from tests.server.conftest import MODEL_NAME, http
from tests.test_structured_output_schemas import SCHEMAS, validate

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Reply in JSON."}]


def _json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_json_schemas_validate(client):
    """Every schema, concurrently (the engine batches them), through vLLM's structured_outputs field
    with compact JSON; a few through response_format too (free whitespace, OpenAI's default)."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(SCHEMAS)
    assert len(names) >= 20

    def ask(name: str, fmt: bool):
        extra = None if fmt else {"structured_outputs": {"json": SCHEMAS[name], "disable_any_whitespace": True}}
        return client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Reply with JSON for {name}."}], max_tokens=120,
            temperature=0, response_format=_json_schema(name) if fmt else None, extra_body=extra,
        ).choices[0]

    with ThreadPoolExecutor(8) as pool:
        compact = list(pool.map(lambda n: ask(n, False), names))
        free = list(pool.map(lambda n: ask(n, True), names[:4]))
    for name, choice in zip(names, compact):
        assert choice.finish_reason == "stop", (name, choice.message.content)
        validate(SCHEMAS[name], choice.message.content)
    for name, choice in zip(names, free):
        if choice.finish_reason == "stop":
            validate(SCHEMAS[name], choice.message.content)
        else:  # free whitespace can run a small model to max_tokens
            assert choice.finish_reason == "length"


def test_parse_with_pydantic_model(client):
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str
        country: str

    resp = client.chat.completions.parse(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Where is the Eiffel tower? Answer as JSON."}],
        max_tokens=100, temperature=0, response_format=Answer,
    )
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Answer) and parsed.city


def test_structured_outputs_extra_field_and_completions(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,8}"}})
    assert re.fullmatch(r"[A-Z][a-z]{2,8}", r.choices[0].message.content)
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert r.choices[0].message.content in ("alpha", "beta") and r.choices[0].finish_reason == "stop"
    c = client.completions.create(model=MODEL_NAME, prompt="The answer is", max_tokens=40, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = c.choices[0].text
    assert c.choices[0].finish_reason in ("stop", "length")
    if c.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    c = client.completions.create(model=MODEL_NAME, prompt="1 + 1 =", max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= [0-9]+ "."'}})
    assert re.fullmatch(r"[0-9]+\.", c.choices[0].text)


def test_streaming_text_equals_non_streaming(client):
    kw = dict(model=MODEL_NAME, messages=ASK, max_tokens=120, temperature=0,
              extra_body={"structured_outputs": {"json": SCHEMAS["nested_object"], "disable_any_whitespace": True}})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    validate(SCHEMAS["nested_object"], text)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "xml"}, "response_format.type"),
])
def test_bad_response_format_is_a_400(server, fmt, param):
    for stream in (False, True):
        status, body = http(server, "POST", "/v1/chat/completions",
                            {"model": MODEL_NAME, "messages": ASK, "response_format": fmt, "stream": stream})
        assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize("so, param", [
    ({"regex": "(abc"}, "structured_outputs.regex"),
    ({"grammar": "root ::= nope"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"grammar": "root ::= [^\\x00-\\U0010FFFF]"}, "structured_outputs.grammar"),  # no first token
    ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs"),
    ({"jsonn": {}}, "structured_outputs.jsonn"),
])
def test_bad_structured_outputs_is_a_400(server, so, param):
    status, body = http(server, "POST", "/v1/completions",
                        {"model": MODEL_NAME, "prompt": "x", "structured_outputs": so, "stream": True})
    assert status == 400 and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"
    # the engine keeps serving
    status, body = http(server, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})
    assert status == 200
