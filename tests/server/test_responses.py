"""POST /v1/responses with the official client (``responses.create`` / ``responses.stream``) against a
real server: text, instructions, max_output_tokens, text.format json_schema, function tools (forced),
typed stream events that assemble to the non-streamed response, the bounded store behind
previous_response_id (404 when unknown or evicted), 400s naming the field, KV blocks returned."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, http, spawn_server, stop_server
from tests.server.test_tools import SCHEMAS, TOOL_ARGS, TOOLS, _kv_idle

R_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
            "parameters": t["function"]["parameters"]} for t in TOOLS]
QUESTION = "What is the weather in Paris for the next 3 days?"
STORE = 3


@pytest.fixture(scope="module")
def srv(tmp_path_factory, default_model_path):
    s = spawn_server(tmp_path_factory.mktemp("responses") / "server.log", *TOOL_ARGS,
                     "--max-stored-responses", str(STORE))
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def _both(client, **kw):
    """The non-streamed response, the streamed final response, and the events."""
    r = client.responses.create(model=MODEL_NAME, **kw)
    with client.responses.stream(model=MODEL_NAME, **kw) as s:
        events = list(s)
        f = s.get_final_response()
    return r, f, events


def _items(resp) -> list[tuple]:
    out = []
    for item in resp.output:
        if item.type == "message":
            out.append(("message", "".join(c.text for c in item.content)))
        elif item.type == "function_call":
            out.append(("function_call", item.name, item.arguments))
        else:
            out.append((item.type,))
    return out


def test_text_streamed_and_not(client, srv):
    r, f, events = _both(client, input=QUESTION, instructions="Answer briefly.", max_output_tokens=16,
                         temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 16 and r.usage.input_tokens > 10
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert _items(f) == _items(r) and f.output_text == r.output_text and f.status == "incomplete"
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
              "response.output_text.done", "response.output_item.done"):
        assert k in kinds, k
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    plain = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=4, temperature=0)
    assert plain.usage.input_tokens != r.usage.input_tokens  # the instructions reached the prompt
    _kv_idle(srv)


def test_input_items_and_text_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    items = [{"role": "system", "content": "Reply in JSON."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Is Paris in France?"}]}]
    r, f, _ = _both(client, input=items, max_output_tokens=60, temperature=0,
                    text={"format": {"type": "json_schema", "name": "yn", "schema": schema, "strict": True}})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    assert f.output_text == r.output_text


@pytest.mark.parametrize("choice", [{"type": "function", "name": "get_weather"}, "required"])
def test_forced_function_call(client, srv, choice):
    r, f, events = _both(client, input=QUESTION, tools=R_TOOLS, tool_choice=choice, temperature=0,
                         max_output_tokens=80, parallel_tool_calls=False)
    calls = [i for i in r.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].call_id and calls[0].status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    assert _items(f) == _items(r)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == calls[0].arguments
    assert "response.function_call_arguments.done" in [e.type for e in events]
    _kv_idle(srv)


def test_previous_response_id_continues(client):
    first = client.responses.create(model=MODEL_NAME, input=QUESTION, tools=R_TOOLS,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                    max_output_tokens=80)
    call = next(i for i in first.output if i.type == "function_call")
    second = client.responses.create(model=MODEL_NAME, previous_response_id=first.id, temperature=0,
                                     max_output_tokens=8,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 21 C"}])
    assert second.previous_response_id == first.id and second.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text
    # a stateless replay of the same conversation (tools are not carried over) gives the same prompt and reply
    replay = client.responses.create(model=MODEL_NAME, temperature=0, max_output_tokens=8, input=[
                                         {"role": "user", "content": QUESTION},
                                         {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                          "arguments": call.arguments},
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": "Sunny, 21 C"}])
    assert replay.usage.input_tokens == second.usage.input_tokens and replay.output_text == second.output_text
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL_NAME, input="hi", previous_response_id="resp_unknown", max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id" and "resp_unknown" in str(e.value)


def test_store_is_bounded_and_optional(client):
    unstored = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL_NAME, input="hi", previous_response_id=unstored.id, max_output_tokens=2)
    ids = [client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2).id for _ in range(STORE + 1)]
    with pytest.raises(openai.NotFoundError):  # the oldest was evicted
        client.responses.create(model=MODEL_NAME, input="hi", previous_response_id=ids[0], max_output_tokens=2)
    ok = client.responses.create(model=MODEL_NAME, input="hi", previous_response_id=ids[-1], max_output_tokens=2)
    assert ok.previous_response_id == ids[-1]


BAD = [
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "messages[0].tool_call_id"),
    ({"tools": R_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "objectx"}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,param", BAD)
def test_bad_input_is_400_naming_the_field(srv, extra, param, stream):
    body = {"model": MODEL_NAME, "input": QUESTION, "max_output_tokens": 4, "stream": stream, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    status, out = http(srv, "POST", "/v1/responses", body)
    assert status == 400, out
    assert out["error"]["param"] == param, out
    _kv_idle(srv)


def test_aborted_stream_returns_blocks(client, srv):
    with client.responses.stream(model=MODEL_NAME, input=QUESTION, max_output_tokens=300, temperature=0) as s:
        for k, _ in enumerate(s):
            if k == 5:
                break
    _kv_idle(srv)
