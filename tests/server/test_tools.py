"""Tool calling on /v1/chat/completions against real servers, with the official client: forced calls
(``required`` / a named function) always parse and validate, on SmolLM2 and on a random model;
``auto`` calls parsed by the hermes parser; streamed (the SDK's helpers) equals non-streamed;
multi-turn with tool results; every bad tool field a 400 naming it; all KV blocks returned."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, http, spawn_server, stop_server

TEMPLATE = str(Path(__file__).resolve().parents[2] / "engine/entrypoints/templates/tool_chat_template_hermes.jinja")
TOOL_ARGS = ("--chat-template", TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
        "required": ["tz"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, default_model_path):
    srv = spawn_server(tmp_path_factory.mktemp("tools") / "server.log", *TOOL_ARGS)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def tiny_tool_server(tmp_path_factory, tiny_model_path):
    srv = spawn_server(tmp_path_factory.mktemp("tools-tiny") / "server.log", "--model", str(tiny_model_path),
                       "--max-model-len", "1024", *TOOL_ARGS)
    try:
        yield srv
    finally:
        stop_server(srv)


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in (message.tool_calls or [])]


def _assert_valid(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, args in calls:
        jsonschema.validate(json.loads(args), SCHEMAS[name])


def _both(client, **kw):
    """The non-streamed message and finish reason, and what the SDK's stream helper assembles."""
    r = client.chat.completions.create(model=MODEL_NAME, **kw)
    with client.chat.completions.stream(model=MODEL_NAME, **kw) as s:
        for _ in s:
            pass
        try:
            f = s.get_final_completion()
        except openai.LengthFinishReasonError as e:  # the helper refuses to parse a cut reply: take it as is
            f = e.completion
    return r.choices[0], f.choices[0]


def _kv_idle(srv) -> None:
    """Every KV block is back once the requests are done (bounded wait)."""
    deadline = time.monotonic() + 20
    while True:
        status, text = http(srv, "GET", "/metrics")
        assert status == 200
        usage = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("vllm:kv_cache_usage_perc"))
        if usage == 0:
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {usage}"
        time.sleep(0.2)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}},
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_parse_and_validate(tool_server, choice):
    client = _client(tool_server)
    r, s = _both(client, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=80,
                 parallel_tool_calls=False)
    assert r.finish_reason == s.finish_reason == "tool_calls"
    assert r.message.content is None and s.message.content is None
    _assert_valid(_calls(r.message))
    assert len(r.message.tool_calls) == 1
    if isinstance(choice, dict):
        assert r.message.tool_calls[0].function.name == choice["function"]["name"]
    assert _calls(s.message) == _calls(r.message)
    assert r.message.tool_calls[0].id.startswith("chatcmpl-tool-") and r.message.tool_calls[0].type == "function"
    _kv_idle(tool_server)


def test_required_parallel_calls_all_validate(tool_server):
    client = _client(tool_server)
    r, s = _both(client, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    _assert_valid(_calls(r.message))  # every complete call; a length cut leaves the rest as content
    assert _calls(s.message) == _calls(r.message) and s.message.content == r.message.content
    assert r.finish_reason == s.finish_reason


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_calls_on_random_weights(tiny_tool_server, seed):
    """Whatever the weights pick, the schema keeps the call valid (sampled at temperature 1)."""
    client = _client(tiny_tool_server)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        _assert_valid(_calls(r.choices[0].message))
    _kv_idle(tiny_tool_server)


HERMES_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')


@pytest.mark.parametrize("srv_name", ["tool_server", "tiny_tool_server"])
def test_auto_calls_parsed_by_hermes(request, srv_name):
    """tool_choice auto: the output (pinned here by a one-choice constraint, since a small model
    rarely calls tools on its own) goes through --tool-call-parser hermes, streamed and not."""
    srv = request.getfixturevalue(srv_name)
    client = _client(srv)
    r, s = _both(client, messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
                 extra_body={"structured_outputs": {"choice": [HERMES_TEXT]}})
    assert r.finish_reason == s.finish_reason == "tool_calls"
    assert _calls(r.message) == [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"tz": "CET"}')]
    assert r.message.content == "Let me check. \n"
    assert _calls(s.message) == _calls(r.message) and s.message.content == r.message.content


PINNED = {  # an output in each parser's format, and the calls it holds
    "llama3_json": ('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
                    '{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}', ""),
    "pythonic": ('[get_time(tz="UTC"), get_weather(city="Rome", days=2)]', ""),
    "mistral": ('On it.[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}]', "On it."),
}


@pytest.mark.parametrize("parser", sorted(PINNED))
def test_other_parsers_end_to_end(tmp_path, tiny_model_path, parser):
    text, content = PINNED[parser]
    srv = spawn_server(tmp_path / "server.log", "--model", str(tiny_model_path), "--chat-template", TEMPLATE,
                       "--enable-auto-tool-choice", "--tool-call-parser", parser)
    try:
        r, s = _both(_client(srv), messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
                     extra_body={"structured_outputs": {"choice": [text]}})
        assert r.finish_reason == s.finish_reason == "tool_calls"
        assert _calls(r.message) == [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "Rome", "days": 2}')]
        assert (r.message.content or "") == content
        assert _calls(s.message) == _calls(r.message) and s.message.content == r.message.content
        _kv_idle(srv)
    finally:
        stop_server(srv)


def test_auto_without_calls_is_plain_text(tool_server):
    client = _client(tool_server)
    r, s = _both(client, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=16)
    assert r.message.tool_calls is None and r.message.content and r.finish_reason == "length"
    assert s.message.content == r.message.content and not s.message.tool_calls
    none = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=16)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_multi_turn_with_tool_results(tool_server):
    client = _client(tool_server)
    first = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=80, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    convo = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    r, s = _both(client, messages=convo, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24)
    assert r.message.content and r.message.content == s.message.content
    # the assistant's call and the tool result reached the prompt (the template renders both)
    bare = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    full = client.chat.completions.create(model=MODEL_NAME, messages=convo, tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    assert full.usage.prompt_tokens > bare.usage.prompt_tokens + 20
    # and a second forced call after the result works too
    again = client.chat.completions.create(model=MODEL_NAME, messages=convo, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0, max_tokens=40)
    _assert_valid(_calls(again.choices[0].message))
    _kv_idle(tool_server)


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "tool", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": {"id": "c"}}]}, "messages[1].tool_calls"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra,param", BAD)
def test_bad_tool_input_is_400_naming_the_field(tool_server, extra, param, stream):
    body = {"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, "stream": stream, **extra}
    status, out = http(tool_server, "POST", "/v1/chat/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == param, out
    assert out["error"]["type"] == "invalid_request_error"
    _kv_idle(tool_server)


def test_template_without_tools_is_400_naming_the_flag(server):
    """The default server runs SmolLM2's own template, which ignores tools."""
    body = {"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, "tools": TOOLS, "tool_choice": "required"}
    status, out = http(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and "--chat-template" in out["error"]["message"] and out["error"]["param"] == "tools"
    status, out = http(server, "POST", "/v1/chat/completions", {**body, "tool_choice": "auto"})
    assert status == 400 and "--enable-auto-tool-choice" in out["error"]["message"]


def test_aborted_tool_stream_returns_blocks(tool_server):
    client = _client(tool_server)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=180, stream=True)
    for k, _ in enumerate(stream):
        if k == 3:
            break
    stream.close()
    _kv_idle(tool_server)


def test_offline_chat_renders_tools(default_model_path):
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutputsParams

    llm = LLM(max_model_len=1024, num_gpu_blocks_override=64)
    try:
        with pytest.raises(ValueError, match="chat_template"):
            llm.chat(ASK, tools=TOOLS, use_tqdm=False)
        params = SamplingParams(temperature=0, max_tokens=60,
                                structured_outputs=StructuredOutputsParams(json=WEATHER, disable_any_whitespace=True))
        out = llm.chat(ASK, params, tools=TOOLS, chat_template=TEMPLATE, use_tqdm=False)[0]
        assert "get_weather" in out.prompt and "<tools>" in out.prompt
        jsonschema.validate(json.loads(out.outputs[0].text), WEATHER)
        with pytest.raises(ValueError, match="tool_call_id"):
            llm.chat(ASK + [{"role": "tool", "tool_call_id": "x", "content": "1"}], tools=TOOLS,
                     chat_template=TEMPLATE, use_tqdm=False)
        kv = llm.llm_engine.kv_cache
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        llm.shutdown()
