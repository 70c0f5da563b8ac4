"""Structured outputs for reasoning models: the constraint starts where the reasoning ends.

A request's constraint (response_format, structured_outputs, a forced tool call) becomes an
xgrammar structural tag: free text up to ``</think>`` (after ``<think>`` for qwen3, which writes it
itself; deepseek_r1 templates often put it in the prompt), then the original constraint. So the
model reasons unconstrained and its answer still matches. Kinds a structural tag cannot hold
(a Lark grammar, a structural tag of the request's own) keep applying from the first token.
"""
from __future__ import annotations

import json

from engine.structured_output.params import StructuredOutputsParams

_BEGIN = {"deepseek_r1": "", "qwen3": "<think>"}


def _element(params: StructuredOutputsParams) -> dict | None:
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, str):
            schema = json.loads(schema)
        return {"type": "json_schema", "json_schema": schema}
    if kind == "regex":
        return {"type": "regex", "pattern": params.regex}
    if kind == "choice":
        from engine.structured_output.xgrammar_backend import choice_ebnf

        return {"type": "grammar", "grammar": choice_ebnf(params.choice)}
    if kind == "grammar" and "::=" in params.grammar:  # EBNF (a Lark grammar has no '::=')
        return {"type": "grammar", "grammar": params.grammar}
    return None


def constraint_after_reasoning(reasoning_parser: str | None,
                               params: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
    if reasoning_parser is None or params is None:
        return params
    element = _element(params)
    if element is None:
        return params
    think = {"type": "tag", "begin": _BEGIN.get(reasoning_parser, "<think>"), "content": {"type": "any_text"},
             "end": "</think>"}
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [think, element]}}
    wrapped = StructuredOutputsParams(structural_tag=tag)
    wrapped._param = params.param
    return wrapped
