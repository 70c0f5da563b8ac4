"""POST /v1/messages with the official ``anthropic`` client against a real server: text, system,
stop sequences, sampling fields, tools (forced and round-tripped), streaming (the client's own
accumulator) equal to non-streaming, Anthropic's error shape, x-api-key auth, KV blocks returned."""
from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, http, spawn_server, stop_server
from tests.server.test_tools import ASK, SCHEMAS, TOOL_ARGS, TOOLS, _kv_idle

A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
USER = [{"role": "user", "content": ASK[0]["content"]}]
# this client version has no typed sampling arguments: they travel as extra body fields
T0 = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, default_model_path):
    s = spawn_server(tmp_path_factory.mktemp("anthropic") / "server.log", *TOOL_ARGS)
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture(scope="module")
def client(srv):
    with anthropic.Anthropic(base_url=srv.url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def _both(client, **kw):
    """The non-streamed message, the streamed one as the client assembles it, and the event types."""
    r = client.messages.create(model=MODEL_NAME, **kw)
    with client.messages.stream(model=MODEL_NAME, **kw) as s:
        kinds = [e.type for e in s]
        f = s.get_final_message()
    return r, f, kinds


def _blocks(m) -> list[tuple]:
    return [(b.type, b.text) if b.type == "text" else (b.type, b.name, b.input) for b in m.content]


def test_text_streamed_and_not(client, srv):
    r, f, kinds = _both(client, messages=USER, max_tokens=16, **T0)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 16 and r.usage.input_tokens > 10
    assert _blocks(r) == _blocks(f) and r.content[0].type == "text" and r.content[0].text
    assert f.stop_reason == "max_tokens" and f.usage.output_tokens == 16
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    _kv_idle(srv)


SYSTEM = "You are a terse weather bot that answers every question in one short, plain sentence. " * 2


def test_system_top_k_and_end_turn(client):
    plain = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=4, **T0)
    sys = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=4, **T0,
                                 system=SYSTEM)
    assert sys.usage.input_tokens > plain.usage.input_tokens
    blocks = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=4, **T0,
                                    system=[{"type": "text", "text": SYSTEM}])
    assert blocks.usage.input_tokens == sys.usage.input_tokens and _blocks(blocks) == _blocks(sys)
    k1 = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=8,
                                extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9})
    assert _blocks(k1)[0][1].startswith(_blocks(plain)[0][1])  # top_k=1 is greedy
    done = client.messages.create(model=MODEL_NAME, max_tokens=200, **T0,
                                  messages=[{"role": "user", "content": "Say the word 'yes' and nothing else."}])
    assert done.stop_reason == "end_turn" and done.usage.output_tokens < 200


def test_stop_sequences(client):
    text = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=24, **T0).content[0].text
    word = text.split()[3]
    r, f, _ = _both(client, messages=USER, max_tokens=24, **T0, stop_sequences=[word])
    assert r.stop_reason == f.stop_reason == "stop_sequence" and r.stop_sequence == f.stop_sequence == word
    assert text.startswith(r.content[0].text) and word not in r.content[0].text
    assert _blocks(r) == _blocks(f)


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "tool", "name": "get_time"},
                                    {"type": "any", "disable_parallel_tool_use": True}])
def test_forced_tool_use(client, srv, choice):
    r, f, kinds = _both(client, messages=USER, max_tokens=80, **T0, tools=A_TOOLS, tool_choice=choice)
    assert r.stop_reason == f.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id.startswith("toolu_")
    if choice["type"] == "tool":
        assert uses[0].name == choice["name"]
    jsonschema.validate(uses[0].input, SCHEMAS[uses[0].name])
    assert _blocks(r) == _blocks(f)
    assert "content_block_delta" in kinds
    _kv_idle(srv)


def test_tool_result_round_trip(client):
    first = client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=80, **T0, tools=A_TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather"})
    use = next(b for b in first.content if b.type == "tool_use")
    convo = USER + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": [{"type": "text", "text": "Sunny, 21 C"}]}]}]
    r, f, _ = _both(client, messages=convo, max_tokens=16, **T0, tools=A_TOOLS,
                    tool_choice={"type": "none"})
    assert r.content[0].type == "text" and _blocks(r) == _blocks(f)
    assert r.usage.input_tokens > first.usage.input_tokens + 20  # the call and the result are in the prompt


BAD = [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": USER + [{"role": "assistant", "content": "ok"},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
     "messages[2].content[0].tool_use_id"),
    ({"tools": [{"name": "f", "input_schema": {"type": "objectx"}}], "tool_choice": {"type": "any"}},
     "tools[0].function.parameters"),
    ({"tools": A_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.function.name"),
    ({"tools": A_TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"temperature": 1.5}, "temperature"),
    ({"stop_sequences": "x"}, "stop_sequences"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,field", BAD)
def test_bad_input_in_anthropic_shape(srv, extra, field, stream):
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 4, "stream": stream, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    status, out = http(srv, "POST", "/v1/messages", body, auth=False, headers={"x-api-key": API_KEY})
    assert status == 400, out
    assert out["type"] == "error" and out["error"]["type"] == "invalid_request_error", out
    assert field in out["error"]["message"], out
    _kv_idle(srv)


def test_client_errors_map_to_anthropic_exceptions(srv, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL_NAME, messages=USER, max_tokens=0)
    assert "max_tokens" in str(e.value)
    with anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model=MODEL_NAME, messages=USER, max_tokens=4)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", messages=USER, max_tokens=4)
    status, out = http(srv, "POST", "/v1/messages", data=b"{nope", headers={"Content-Type": "application/json"})
    assert status == 400 and out["type"] == "error"


def test_aborted_stream_returns_blocks(client, srv):
    with client.messages.stream(model=MODEL_NAME, messages=USER, max_tokens=300, **T0) as s:
        for k, _ in enumerate(s):
            if k == 4:
                break
    _kv_idle(srv)
