"""Tool-call parsers: the full-text parse finds exactly the calls a text holds and keeps every other
character as content; streamed over any chunking, the deltas assemble to exactly that parse."""
from __future__ import annotations

import json
import keyword

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from engine.entrypoints.openai.tool_parsers import ToolCall, ToolCallStreamer, get_tool_parser, tool_parser_names
from engine.entrypoints.openai.tool_parsers.json_parsers import NamedToolParser, RequiredToolParser

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.text(alphabet="ab<>{}[];\"\\ \n/é_", max_size=8))
_json_value = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(alphabet="abc_", min_size=1, max_size=4), inner, max_size=3)),
    max_leaves=6)
_args = st.dictionaries(st.text(alphabet="abcxyz_", min_size=1, max_size=5), _json_value, max_size=4)
_name = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_call = st.tuples(_name, _args)
# a pythonic call is Python: its name cannot be a keyword ("if(...)" does not parse)
_py_name = _name.filter(lambda n: not keyword.iskeyword(n))
_dumps = st.sampled_from([
    lambda v: json.dumps(v), lambda v: json.dumps(v, ensure_ascii=False), lambda v: json.dumps(v, indent=1),
    lambda v: json.dumps(v, separators=(",", ":")),
])


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


def assemble(parser, text: str, cuts: list[int]):
    """Streams ``text`` in chunks through a ToolCallStreamer; returns (content, calls) as the
    openai client's stream helpers would rebuild them, checking the delta order on the way."""
    streamer = ToolCallStreamer(parser)
    content, calls, acc = "", {}, ""
    order: list[tuple] = []  # ("content", text) merged, ("call", index): what block APIs build
    pieces = _chunks(text, cuts)
    for k, piece in enumerate(pieces):
        acc += piece
        delta = streamer.step(acc, final=k == len(pieces) - 1)
        for part in delta.parts:
            if "content" in part:
                assert part["content"]
                if order and order[-1][0] == "content":
                    order[-1] = ("content", order[-1][1] + part["content"])
                else:
                    order.append(("content", part["content"]))
            elif "id" in part["tool_call"]:
                order.append(("call", part["tool_call"]["index"]))
        content += delta.content
        for tc in delta.tool_calls:
            i = tc["index"]
            if "id" in tc:
                assert i not in calls, "a call's id and name are sent once"
                assert i == len(calls), "indexes are sent in order"
                calls[i] = [tc["function"]["name"], tc["function"]["arguments"], tc["id"]]
            else:
                assert i in calls, "arguments before the call's id and name"
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[i][1] += tc["function"]["arguments"]
    full = parser.parse(text, final=True)
    final_calls = streamer.final_calls(full)
    assert [c["id"] for c in final_calls] == [calls[i][2] for i in range(len(calls))]
    assert order == interleaved(full), "text and calls interleave the same streamed and not"
    return content, [ToolCall(calls[i][0], calls[i][1]) for i in range(len(calls))]


def interleaved(parsed) -> list[tuple]:
    """The full parse as ordered segments, by each call's content offset."""
    segs, pos = [], 0
    for i, c in enumerate(parsed.calls):
        assert pos <= c.offset <= len(parsed.content)
        if c.offset > pos:
            segs.append(("content", parsed.content[pos:c.offset]))
            pos = c.offset
        segs.append(("call", i))
    if len(parsed.content) > pos:
        segs.append(("content", parsed.content[pos:]))
    return segs


def check_stream_matches(parser, text: str, cuts: list[int]) -> None:
    full = parser.parse(text, final=True)
    content, calls = assemble(parser, text, cuts)
    assert content == full.content
    assert calls == full.calls


def expected(calls: list[tuple[str, dict]]) -> list[ToolCall]:
    return [ToolCall(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]


def test_server_options_checked_at_start_up():
    from engine.entrypoints.openai.tools import ToolOptions

    with pytest.raises(ValueError, match="--tool-call-parser"):
        ToolOptions(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="choose one of"):
        ToolOptions(True, "hermes2")
    with pytest.raises(ValueError, match="choose one of"):
        ToolOptions(reasoning_parser="r2")
    assert ToolOptions(True, "pythonic", "qwen3").tool_call_parser == "pythonic"


def test_registry_has_vllm_names():
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(tool_parser_names())
    with pytest.raises(ValueError, match="choose one of"):
        get_tool_parser("nope")


# ---- any text: streaming equals the full parse --------------------------------------------------
_noise = st.lists(st.sampled_from(list("ab {}[]();:,\"=\n") + [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '{"name": "f", "arguments": {}}',
    '{"name": "g", "parameters": {"a": 1}}', "f(a=1)", "<tool_", "[TOOL", "<|python_start|>"]), max_size=24).map("".join)


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral", "pythonic"])
@SETTINGS
@given(text=_noise, cuts=st.lists(st.integers(0, 400), max_size=12))
def test_any_text_streams_as_parsed(name, text, cuts):
    check_stream_matches(get_tool_parser(name)(), text, cuts)


# ---- constructed outputs: exactly the calls, every other character is content -------------------
_content = st.text(alphabet="ab <>/_tolc{}\n:é", max_size=12)


@SETTINGS
@given(parts=st.lists(st.one_of(_content.map(lambda s: ("text", s)), _call.map(lambda c: ("call", c))), max_size=6),
       dumps=_dumps, nl=st.booleans(), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_hermes_constructed(parts, dumps, nl, cuts):
    text, content, calls, segs = "", "", [], []
    for kind, v in parts:
        if kind == "text":
            text += v
            content += v
            if v:
                if segs and segs[-1][0] == "content":
                    segs[-1] = ("content", segs[-1][1] + v)
                else:
                    segs.append(("content", v))
        else:
            segs.append(("call", len(calls)))
            body = dumps({"name": v[0], "arguments": v[1]})
            assume("</tool_call>" not in body)
            sep = "\n" if nl else ""
            text += f"<tool_call>{sep}{body}{sep}</tool_call>"
            calls.append(v)
    assume("<tool_call>" not in content)
    parser = get_tool_parser("hermes")()
    full = parser.parse(text, final=True)
    assert full.calls == expected(calls)
    assert full.content == content
    assert interleaved(full) == segs
    check_stream_matches(parser, text, cuts)


def test_hermes_bad_block_stays_content():
    parser = get_tool_parser("hermes")()
    text = 'a<tool_call>{"name": 3}</tool_call>b<tool_call>{"name": "f", "arguments": {"x": 1}}'
    full = parser.parse(text, final=True)
    assert full.content == 'a<tool_call>{"name": 3}</tool_call>b'
    assert full.calls == [ToolCall("f", '{"x": 1}')]  # an unclosed block at the end still parses
    assert parser.parse("x<tool_c", final=False).content == "x"  # a possible tag start is held back


@SETTINGS
@given(calls=st.lists(_call, min_size=1, max_size=4), dumps=_dumps, tag=st.booleans(),
       tail=st.text(alphabet="ab <>\n", max_size=10).filter(lambda s: not s.strip() or s.strip()[0] not in "{;"),
       cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_llama3_json_constructed(calls, dumps, tag, tail, cuts):
    text = ("<|python_tag|>" if tag else "") + "; ".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    if tail.strip():
        text += " " + tail
    parser = get_tool_parser("llama3_json")()
    full = parser.parse(text, final=True)
    assert full.calls == expected(calls)
    assert full.content == tail.lstrip(" \t\n\r")  # the whitespace after the last call separates
    check_stream_matches(parser, text, cuts)


@SETTINGS
@given(text=st.text(alphabet="ab <>\n{", max_size=20).filter(lambda s: s.strip()[:1] not in ("{", "<", "")),
       cuts=st.lists(st.integers(0, 100), max_size=8))
def test_llama3_json_plain_text_is_content(text, cuts):
    parser = get_tool_parser("llama3_json")()
    assert parser.parse(text, final=True).content == text
    check_stream_matches(parser, text, cuts)


@SETTINGS
@given(head=st.text(alphabet="ab [\n]TOLS_", max_size=12).filter(lambda s: "[TOOL_CALLS]" not in s),
       calls=st.lists(_call, min_size=1, max_size=3), dumps=_dumps,
       tail=st.text(alphabet="ab \n", max_size=6), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_mistral_constructed(head, calls, dumps, tail, cuts):
    text = head + "[TOOL_CALLS]" + dumps([{"name": n, "arguments": a} for n, a in calls]) + tail
    parser = get_tool_parser("mistral")()
    full = parser.parse(text, final=True)
    assert full.calls == expected(calls)
    assert full.content == head + tail
    check_stream_matches(parser, text, cuts)


_py_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text("ab'\" ]", max_size=5)),
                         lambda inner: st.lists(inner, max_size=3), max_leaves=4)


@SETTINGS
@given(calls=st.lists(st.tuples(_py_name, st.dictionaries(st.sampled_from(["a", "b", "city"]), _py_value, max_size=3)),
                      min_size=1, max_size=3),
       wrap=st.booleans(), cuts=st.lists(st.integers(0, 500), max_size=12))
def test_pythonic_constructed(calls, wrap, cuts):
    src = "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")" for n, a in calls) + "]"
    text = f"<|python_start|>{src}<|python_end|>" if wrap else src
    parser = get_tool_parser("pythonic")()
    full = parser.parse(text, final=True)
    assert full.calls == expected(calls)
    assert full.content == ""
    check_stream_matches(parser, text, cuts)
    plain = "The answer is [1, 2]"
    assert parser.parse(plain, final=True).content == plain


# ---- forced calls --------------------------------------------------------------------------------
@SETTINGS
@given(args=_args, dumps=_dumps, cut=st.integers(0, 10**6), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_named_streams_arguments_in_pieces(args, dumps, cut, cuts):
    text = dumps(args)
    text = text[:cut % (len(text) + 1)]  # a length cut leaves a prefix: streamed and not, the same
    parser = NamedToolParser("get_weather")
    full = parser.parse(text, final=True)
    assert full.calls == [ToolCall("get_weather", text)] and full.content == ""
    check_stream_matches(parser, text, cuts)


@SETTINGS
@given(calls=st.lists(_call, min_size=1, max_size=4), dumps=_dumps, cut=st.one_of(st.none(), st.integers(0, 10**6)),
       cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_required_constructed(calls, dumps, cut, cuts):
    text = dumps([{"name": n, "parameters": a} for n, a in calls])
    parser = RequiredToolParser()
    if cut is None:
        full = parser.parse(text, final=True)
        assert full.calls == expected(calls) and full.content == ""
    else:
        text = text[:cut % (len(text) + 1)]
        full = parser.parse(text, final=True)
        assert full.calls == expected(calls)[:len(full.calls)]
    check_stream_matches(parser, text, cuts)


def test_tool_fields_checked():
    """The request-side checks (the server tests cover them over HTTP too)."""
    from engine.entrypoints.openai.protocol import OpenAIError
    from engine.entrypoints.openai.tools import ToolOptions, parse_tools

    opts = ToolOptions(True, "hermes")
    assert parse_tools({"tools": [], "tool_choice": "auto"}, opts) is None  # an empty list is no tools
    with pytest.raises(OpenAIError) as e:
        parse_tools({"tools": [], "tool_choice": "required"}, opts)
    assert e.value.param == "tools"
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = parse_tools({"tools": [fn, {**fn, "function": {"name": "g"}}], "tool_choice": "required",
                       "parallel_tool_calls": False}, opts)
    schema = req.constraint_schema()
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    with pytest.raises(OpenAIError) as e:
        parse_tools({"tools": [fn, fn]}, opts)
    assert e.value.param == "tools[1].function.name"
