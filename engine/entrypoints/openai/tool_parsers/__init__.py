"""Tool-call parsers (vLLM's ``--tool-call-parser`` names) behind one interface: see base.py."""
from engine.entrypoints.openai.tool_parsers.base import (
    ParsedOutput, StreamDelta, ToolCall, ToolCallStreamer, ToolParser, get_tool_parser, register_tool_parser,
    tool_parser_names,
)

__all__ = ["ParsedOutput", "StreamDelta", "ToolCall", "ToolCallStreamer", "ToolParser", "get_tool_parser",
           "register_tool_parser", "tool_parser_names"]
