"""Tool calls written as bare JSON: Llama 3's ``llama3_json``, Mistral's ``[TOOL_CALLS][...]``, and the
two forced modes (``tool_choice="required"`` / a named function), whose output is generated under a
JSON schema (see engine/entrypoints/openai/tools.py).

Each JSON value is taken with ``raw_decode``: an object or array is complete exactly when its
closing bracket arrives, and nothing after it can change it, so a stream may send it then.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from engine.entrypoints.openai.tool_parsers.base import (
    ParsedOutput, ToolCall, ToolParser, call_from_object, held_back, register_tool_parser,
)

_decoder = json.JSONDecoder()
_WS = " \t\n\r"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _decode(text: str, pos: int) -> tuple[Any, int] | None:
    try:
        return _decoder.raw_decode(text, pos)
    except ValueError:
        return None


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}`` objects separated by ``;`` at the start of the output
    (optionally after ``<|python_tag|>``); from the first thing that is not a call on, content."""

    prefix = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        pos = _skip_ws(text, 0)
        if text.startswith(self.prefix, pos):
            pos = _skip_ws(text, pos + len(self.prefix))
        elif not final and pos < len(text) and self.prefix.startswith(text[pos:]):
            return ParsedOutput()  # may still become the tag
        calls: list[ToolCall] = []
        content_from = 0
        while pos < len(text) and text[pos] == "{":
            got = _decode(text, pos)
            if got is None:
                if not final:
                    return ParsedOutput(calls=calls)  # an object still being written: undecided
                break
            call = call_from_object(got[0])
            if call is None:
                break
            calls.append(call)
            after = _skip_ws(text, got[1])
            content_from = after
            if after < len(text) and text[after] == ";":
                pos = content_from = _skip_ws(text, after + 1)
                continue
            if after >= len(text) and not final:
                return ParsedOutput(calls=calls)  # a ";" and another call may follow
            break
        if not calls:
            if not final and pos >= len(text):
                return ParsedOutput()  # only whitespace (and the tag) so far: a call may follow
            content_from = 0
        return ParsedOutput(content=text[content_from:], calls=calls)


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    """Content, then ``[TOOL_CALLS]`` and a JSON array of ``{"name", "arguments"}`` objects; text
    after the array is content too. ``[TOOL_CALLS]`` is a special token in Mistral's vocabularies:
    serve such models with ``skip_special_tokens`` false so the marker reaches the parser."""

    marker = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        out = ParsedOutput()
        i = text.find(self.marker)
        if i < 0:
            keep = 0 if final else held_back(text, (self.marker,))
            out.content = text[:len(text) - keep]
            return out
        head = text[:i]
        got = _decode(text, _skip_ws(text, i + len(self.marker)))
        calls = None
        if got is not None and isinstance(got[0], list) and got[0]:
            calls = [call_from_object(o) for o in got[0]]
            if any(c is None for c in calls):
                calls = None
        if calls is None:
            if got is None and not final:
                out.content = head  # the array is still being written
            else:
                out.content = text  # not a call list: all of it is content
            return out
        out.calls = [replace(c, offset=len(head)) for c in calls]
        out.content = head + text[got[1]:]
        return out


class NamedToolParser(ToolParser):
    """``tool_choice`` naming a function: the whole output is that call's arguments (generated
    under the function's parameter schema), streamed as it is written."""

    def __init__(self, function_name: str, tokenizer: Any = None) -> None:
        super().__init__(tokenizer)
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput(calls=[ToolCall(self.function_name, text)], last_call_open=not final)


class RequiredToolParser(ToolParser):
    """``tool_choice="required"``: the output is a JSON array of ``{"name", "parameters"}``
    objects (the schema guarantees it); each call is sent once its object closes. Text that is not
    a complete element (only a length cut leaves any) is content."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        out = ParsedOutput()
        pos = _skip_ws(text, 0)
        if pos >= len(text) or text[pos] != "[":
            out.content = text if final or text[pos:] else ""
            return out
        pos = _skip_ws(text, pos + 1)
        while pos < len(text):
            got = _decode(text, pos)
            call = call_from_object(got[0], ("parameters",)) if got is not None else None
            if call is None:
                break
            out.calls.append(call)
            pos = _skip_ws(text, got[1])
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif pos < len(text) and text[pos] == "]":
                pos = _skip_ws(text, pos + 1)
                break
            else:
                break
        if final and pos < len(text):
            out.content = text[pos:] if out.calls else text
        return out
