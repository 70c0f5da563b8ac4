"""Pythonic tool calls (Llama 3.2 / 4): the output is a Python list of calls with literal keyword
arguments, ``[get_weather(city="Paris"), get_time()]``, optionally inside ``<|python_start|>`` ...
``<|python_end|>``. Anything else is content. A list that may still be a call list is held back
until the output ends (Python's grammar gives no earlier point where it is settled)."""
from __future__ import annotations

import ast
import json

from engine.entrypoints.openai.tool_parsers.base import ParsedOutput, ToolCall, ToolParser, register_tool_parser

_START, _END = "<|python_start|>", "<|python_end|>"


def _calls(src: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(src.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
        try:
            text = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError):  # sets, bytes, complex numbers: not JSON
            return None
        calls.append(ToolCall(node.func.id, text))
    return calls


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.strip()
        wrapped = body.startswith(_START)
        maybe = body[:1] == "[" or wrapped or (body and _START.startswith(body)) or not body
        if not maybe:
            return ParsedOutput(content=text)
        if not final:
            return ParsedOutput()
        if wrapped:
            body = body[len(_START):]
            if body.endswith(_END):
                body = body[:-len(_END)]
        calls = _calls(body)
        return ParsedOutput(calls=calls) if calls else ParsedOutput(content=text)
