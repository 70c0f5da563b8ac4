"""Reasoning parsers (vLLM's ``--reasoning-parser`` names): split ``<think>...</think>`` from the
answer. Same contract as the tool parsers (tool_parsers/base.py): ``parse(text, final=False)`` returns
only what no continuation can change, so streaming sends differences and never takes text back."""
from engine.entrypoints.openai.reasoning.parsers import (
    ReasoningParser, ReasoningSplit, get_reasoning_parser, reasoning_parser_names,
)

__all__ = ["ReasoningParser", "ReasoningSplit", "get_reasoning_parser", "reasoning_parser_names"]
