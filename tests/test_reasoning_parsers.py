"""Reasoning parsers: ``<think>...</think>`` split into reasoning and content the same way streamed
(any chunking) and not; together with tool calls; a constraint that starts after the reasoning;
and a real server with ``--reasoning-parser``."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.entrypoints.openai.chat_output import ChoiceParser
from engine.entrypoints.openai.reasoning import get_reasoning_parser, reasoning_parser_names
from engine.entrypoints.openai.reasoning.constraint import constraint_after_reasoning
from engine.entrypoints.openai.tool_parsers import ToolCall, get_tool_parser
from engine.structured_output.params import StructuredOutputsParams

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_text = st.lists(st.sampled_from(list("ab <>/\n") + ["<think>", "</think>", "<thi", "</thin", "think"]),
                 max_size=20).map("".join)
_plain = st.text(alphabet="ab <>/\nk", max_size=15).filter(lambda s: "</think>" not in s and "<think>" not in s)


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


def stream(cp: ChoiceParser, text: str, cuts: list[int]) -> dict:
    """What a client assembles from the streamed deltas."""
    got = {"reasoning_content": "", "content": "", "calls": []}
    pieces = _chunks(text, cuts)
    for k, piece in enumerate(pieces):
        for d in cp.step(piece, final=k == len(pieces) - 1):
            assert len(d) == 1
            if "tool_calls" in d:
                tc = d["tool_calls"][0]
                if "id" in tc:
                    got["calls"].append([tc["function"]["name"], ""])
                got["calls"][tc["index"]][1] += tc["function"]["arguments"]
            else:
                key, value = next(iter(d.items()))
                got[key] += value
    return got


def test_names():
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(ValueError, match="choose one of"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@SETTINGS
@given(text=_text, cuts=st.lists(st.integers(0, 200), max_size=10))
def test_any_text_streams_as_parsed(name, text, cuts):
    parser = get_reasoning_parser(name)()
    full = ChoiceParser(parser, None).message(text)
    got = stream(ChoiceParser(get_reasoning_parser(name)(), None), text, cuts)
    assert got["reasoning_content"] == (full["reasoning_content"] or "")
    assert got["content"] == full["content"]
    split = parser.parse(text, True)
    assert split.reasoning + split.content in (text, text.replace("<think>", "", 1).replace("</think>", "", 1),
                                               text.replace("</think>", "", 1))


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@SETTINGS
@given(reasoning=_plain, content=_plain, opened=st.booleans(), closed=st.booleans(),
       cuts=st.lists(st.integers(0, 200), max_size=10))
def test_constructed(name, reasoning, content, opened, closed, cuts):
    text = ("<think>" if opened else "") + reasoning + ("</think>" + content if closed else "")
    split = get_reasoning_parser(name)().parse(text, True)
    if name == "qwen3" and not opened:
        assert (split.reasoning, split.content) == ("", text)  # thinking off: all of it is the answer
    else:
        assert split.reasoning == reasoning
        assert split.content == (content if closed else "")
    got = stream(ChoiceParser(get_reasoning_parser(name)(), None), text, cuts)
    assert (got["reasoning_content"], got["content"]) == (split.reasoning, split.content)


@SETTINGS
@given(reasoning=_plain.filter(lambda s: "<tool_call>" not in s), content=_plain,
       args=st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
       cuts=st.lists(st.integers(0, 400), max_size=16))
def test_reasoning_then_tool_calls(reasoning, content, args, cuts):
    """A call written inside the reasoning is reasoning; one after it is a call, never content."""
    call = '<tool_call>{"name": "f", "arguments": %s}</tool_call>' % json.dumps(args)
    text = f"<think>{reasoning}{call}</think>{content}{call}"
    make = lambda: ChoiceParser(get_reasoning_parser("qwen3")(), get_tool_parser("hermes")())  # noqa: E731
    full = make().message(text)
    assert full["reasoning_content"] == (reasoning + call)
    assert full["content"] == (content or None)
    assert [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in full["tool_calls"]] == [
        ToolCall("f", json.dumps(args))]
    got = stream(make(), text, cuts)
    assert got["reasoning_content"] == full["reasoning_content"] and got["content"] == (full["content"] or "")
    assert got["calls"] == [["f", json.dumps(args)]]


def test_constraint_starts_after_reasoning():
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    wrapped = constraint_after_reasoning("deepseek_r1", StructuredOutputsParams(json=schema))
    g = xgr.Grammar.from_structural_tag(json.dumps(wrapped.structural_tag))
    assert accepts(g, 'let me see</think>{"a": 1}')
    assert not accepts(g, 'let me see</think>{"a": "x"}') and not accepts(g, '{"a": 1}')
    wrapped = constraint_after_reasoning("qwen3", StructuredOutputsParams(choice=["yes", "no"]))
    g = xgr.Grammar.from_structural_tag(json.dumps(wrapped.structural_tag))
    assert accepts(g, "<think>hmm</think>no") and not accepts(g, "<think>hmm</think>maybe")
    assert wrapped.param == "structured_outputs.choice"  # errors still name the request's field
    assert constraint_after_reasoning(None, StructuredOutputsParams(regex="a")).regex == "a"


# ---- a real server ---------------------------------------------------------------------------------
THINK_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_server_splits_the_same_streamed_and_not(tmp_path, default_model_path, parser):
    """With a template that opens ``<think>`` for the model, deepseek_r1 reads the (unclosed) output
    as reasoning; qwen3, whose models write the tag themselves, reads it as the answer."""
    from tests.server.conftest import API_KEY, MODEL_NAME, spawn_server, stop_server

    (tmp_path / "think.jinja").write_text(THINK_TEMPLATE)
    srv = spawn_server(tmp_path / "server.log", "--chat-template", str(tmp_path / "think.jinja"),
                       "--reasoning-parser", parser)
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Why is the sky blue?"}],
                  temperature=0, max_tokens=24)
        r = client.chat.completions.create(**kw).choices[0].message.model_dump()
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            d = chunk.choices[0].delta.model_dump() if chunk.choices else {}
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
        if parser == "deepseek_r1":
            assert r["reasoning_content"] and r["content"] == ""
        else:
            assert r["reasoning_content"] is None and r["content"]
        assert (reasoning, content) == (r["reasoning_content"] or "", r["content"])
        if parser == "deepseek_r1":  # the other two APIs give the same split, streamed and not
            import anthropic

            with anthropic.Anthropic(base_url=srv.url, api_key=API_KEY, max_retries=0) as ac:
                kw_a = dict(model=MODEL_NAME, max_tokens=24, messages=kw["messages"], extra_body={"temperature": 0})
                m = ac.messages.create(**kw_a)
                with ac.messages.stream(**kw_a) as st:
                    for _ in st:
                        pass
                    fm = st.get_final_message()
            assert [(b.type, b.thinking) for b in m.content] == [("thinking", r["reasoning_content"])]
            assert [(b.type, b.thinking) for b in fm.content] == [("thinking", r["reasoning_content"])]
            kw_r = dict(model=MODEL_NAME, input=kw["messages"][0]["content"], max_output_tokens=24, temperature=0)
            resp = client.responses.create(**kw_r)
            with client.responses.stream(**kw_r) as st:
                events = list(st)
                fr = st.get_final_response()
            for got in (resp, fr):
                assert [i.type for i in got.output] == ["reasoning"]
                assert got.output[0].content[0].text == r["reasoning_content"]
            assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
                r["reasoning_content"]
    finally:
        stop_server(srv)
