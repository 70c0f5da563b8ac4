"""Hermes / Qwen2.5 tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` anywhere in
the text, any number of them; the text around them is content.

A block whose body is not one JSON call object stays content, tags and all, so nothing the model
wrote is lost. While streaming, a block is held back until its closing tag arrives (only then is it
known to be a call), and so is a suffix that may be the start of ``<tool_call>``.
"""
from __future__ import annotations

import json
from dataclasses import replace

from engine.entrypoints.openai.tool_parsers.base import (
    ParsedOutput, ToolParser, call_from_object, held_back, register_tool_parser,
)


def _call(body: str):
    try:
        return call_from_object(json.loads(body))
    except ValueError:
        return None


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        out = ParsedOutput()
        content: list[str] = []
        pos = 0
        while True:
            i = text.find(self.start, pos)
            if i < 0:
                rest = text[pos:]
                keep = 0 if final else held_back(rest, (self.start,))
                content.append(rest[:len(rest) - keep])
                break
            content.append(text[pos:i])
            body_at = i + len(self.start)
            j = text.find(self.end, body_at)
            if j < 0:  # an open block: undecided until it closes (or, at the end, parsed as it is)
                if final:
                    call = _call(text[body_at:])
                    if call is not None:
                        out.calls.append(replace(call, offset=sum(map(len, content))))
                    else:
                        content.append(text[i:])
                break
            call = _call(text[body_at:j])
            if call is not None:
                out.calls.append(replace(call, offset=sum(map(len, content))))
            else:
                content.append(text[i:j + len(self.end)])
            pos = j + len(self.end)
            # after a closed block the scan starts afresh: a checkpoint
            out.checkpoint, out.checkpoint_content, out.checkpoint_calls = pos, sum(map(len, content)), len(out.calls)
        out.content = "".join(content)
        return out
