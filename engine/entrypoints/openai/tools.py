"""Tool calling for chat requests: the server's tool options, the request's ``tools`` /
``tool_choice`` / ``parallel_tool_calls`` checked (every mistake a 400 naming the field, before
anything is generated), tool-related message fields, and the JSON schema forced calls generate under.

``tool_choice="required"`` generates a JSON array of ``{"name", "parameters"}`` objects (an anyOf
over the tools; one item unless ``parallel_tool_calls``), a named function generates its arguments
object; either way the output always parses and validates, whatever the weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from engine.entrypoints.openai.protocol import OpenAIError

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")
HERMES_TEMPLATE = "engine/entrypoints/templates/tool_chat_template_hermes.jinja"


@dataclass(frozen=True)
class ToolOptions:
    """Server-wide choices (vLLM's flags), made once at start-up."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    max_stored_responses: int = 1024  # /v1/responses store (previous_response_id): an LRU of this many

    def __post_init__(self) -> None:
        from engine.entrypoints.openai.reasoning import get_reasoning_parser
        from engine.entrypoints.openai.tool_parsers import get_tool_parser

        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # an unknown name fails here, naming the choices
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        if self.max_stored_responses < 0:
            raise ValueError("--max-stored-responses must be at least 0")


@dataclass
class ToolRequest:
    """A request's tools, as checked."""

    tools: list[dict]  # OpenAI tool objects ({"type": "function", "function": {...}})
    choice: str  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    schemas: dict[str, dict] = field(default_factory=dict)  # function name -> parameters schema

    def constraint_schema(self) -> dict | None:
        """The JSON schema a forced call generates under (None for none / auto)."""
        if self.choice == "named":
            return self.schemas[self.named]
        if self.choice != "required":
            return None
        items = [{"type": "object",
                  "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in self.schemas.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1,
                                 "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            array["maxItems"] = 1
        return array

    @property
    def template_tools(self) -> list[dict] | None:
        """What the chat template sees as ``tools``."""
        return self.tools or None


def _check_schema(schema: Any, param: str) -> dict:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise OpenAIError(f"'{param}' must be a JSON schema object", param=param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise OpenAIError(f"'{param}' is not a valid JSON schema: {e.message}" + (f" (at {where})" if where else ""),
                          param=param) from None
    return schema


def parse_tools(data: dict, options: ToolOptions) -> ToolRequest | None:
    """The request's tool fields checked; None when it has no tools and no tool_choice."""
    raw_tools = data.get("tools")
    raw_choice = data.get("tool_choice")
    parallel = data.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise OpenAIError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if data.get("functions") is not None:
        raise OpenAIError("'functions' is deprecated and not supported: use 'tools'", param="functions")
    if raw_tools == [] and raw_choice in (None, "none", "auto"):
        raw_tools = raw_choice = None  # clients that always send the fields: an empty list is no tools
    if raw_tools is None:
        if raw_choice not in (None, "none"):
            raise OpenAIError("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        return None
    if not isinstance(raw_tools, list):
        raise OpenAIError("'tools' must be an array of tool objects", param="tools")
    tools, schemas = [], {}
    for i, t in enumerate(raw_tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise OpenAIError(f"'{p}' must be an object", param=p)
        if t.get("type", "function") != "function":
            raise OpenAIError(f"'{p}.type' must be 'function', got {t.get('type')!r}", param=f"{p}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise OpenAIError(f"'{p}.function' is a required object", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise OpenAIError(f"'{p}.function.name' must be 1-64 characters of a-z, A-Z, 0-9, '_', '-', '.', ':'; "
                              f"got {name!r}", param=f"{p}.function.name")
        if name in schemas:
            raise OpenAIError(f"'{p}.function.name' {name!r} is given twice", param=f"{p}.function.name")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise OpenAIError(f"'{p}.function.description' must be a string", param=f"{p}.function.description")
        params = fn.get("parameters")
        schema = _check_schema(params, f"{p}.function.parameters") if params is not None else {
            "type": "object", "properties": {}}
        schemas[name] = schema
        tools.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    if not tools:
        raise OpenAIError("'tools' must hold at least one tool", param="tools")
    req = ToolRequest(tools, "auto", parallel=parallel, schemas=schemas)
    choice_param = "tool_choice" if raw_choice is not None else "tools"  # what to blame for "auto"
    if raw_choice is None:
        raw_choice = "auto"
    if isinstance(raw_choice, str):
        if raw_choice not in TOOL_CHOICES:
            raise OpenAIError(f"'tool_choice' must be one of {list(TOOL_CHOICES)} or a function object, got "
                              f"{raw_choice!r}", param="tool_choice")
        req.choice = raw_choice
    elif isinstance(raw_choice, dict):
        fn = raw_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if raw_choice.get("type") != "function" or not isinstance(name, str):
            raise OpenAIError("'tool_choice' must look like {\"type\": \"function\", \"function\": {\"name\": ...}}",
                              param="tool_choice")
        if name not in schemas:
            raise OpenAIError(f"'tool_choice.function.name' {name!r} is not one of the tools {sorted(schemas)}",
                              param="tool_choice.function.name")
        req.choice, req.named = "named", name
    else:
        raise OpenAIError("'tool_choice' must be a string or a function object", param="tool_choice")
    if req.choice == "auto" and not options.enable_auto_tool_choice:
        raise OpenAIError('"auto" tool choice requires the server to be started with --enable-auto-tool-choice '
                          "and --tool-call-parser NAME; or pass tool_choice \"required\", \"none\" or a named "
                          "function", param=choice_param)
    return req


def message_tool_fields(m: dict, p: str, out: dict, call_ids: set[str]) -> None:
    """Checks and copies a message's tool fields into ``out`` (the message the template sees):
    an assistant's ``tool_calls`` (arguments parsed to objects, as templates expect), a tool
    message's ``tool_call_id``, which must name an earlier call."""
    role = m.get("role")
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise OpenAIError(f"'{p}.tool_calls' must be an array", param=f"{p}.tool_calls")
        rendered = []
        for j, c in enumerate(calls):
            q = f"{p}.tool_calls[{j}]"
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not c["id"] or not isinstance(fn, dict):
                raise OpenAIError(f"'{q}' must be {{\"id\": str, \"type\": \"function\", \"function\": {{\"name\", "
                                  "\"arguments\"}}}}", param=q)
            if c.get("type", "function") != "function":
                raise OpenAIError(f"'{q}.type' must be 'function'", param=f"{q}.type")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise OpenAIError(f"'{q}.function.name' must be a non-empty string", param=f"{q}.function.name")
            args = fn.get("arguments")
            if not isinstance(args, str):
                raise OpenAIError(f"'{q}.function.arguments' must be a JSON string", param=f"{q}.function.arguments")
            try:
                parsed = json.loads(args)
            except ValueError:
                raise OpenAIError(f"'{q}.function.arguments' is not valid JSON", param=f"{q}.function.arguments") from None
            call_ids.add(c["id"])
            rendered.append({"id": c["id"], "type": "function",
                             "function": {"name": fn["name"], "arguments": parsed}})
        out["tool_calls"] = rendered
    elif role == "tool":
        cid = m.get("tool_call_id")
        if not isinstance(cid, str) or not cid:
            raise OpenAIError(f"'{p}.tool_call_id' is a required string", param=f"{p}.tool_call_id")
        if cid not in call_ids:
            raise OpenAIError(f"'{p}.tool_call_id' {cid!r} matches no tool call of an earlier assistant message",
                              param=f"{p}.tool_call_id")
        out["tool_call_id"] = cid
    if m.get("name") is not None and isinstance(m["name"], str):
        out["name"] = m["name"]


def render_with_tools(render: Any, req: ToolRequest | None) -> list[int]:
    """Prompt ids rendered with the request's tools (``render(tools_or_None)``). A template that
    ignores ``tools`` (the same prompt with and without them) would silently drop them: refused,
    naming the fix (not for tool_choice "none", which calls nothing)."""
    tools = req.template_tools if req is not None else None
    ids = render(tools)
    if tools and req.choice != "none" and ids == render(None):
        raise OpenAIError("this model's chat template does not render 'tools'; start the server with "
                          f"--chat-template FILE (a tool-capable template such as {HERMES_TEMPLATE})", param="tools")
    return ids


def forced_constraint(req: ToolRequest | None, current: Any) -> Any:
    """The request's structured-output constraint with a forced call's schema put in; a forced call
    and response_format / structured_outputs together are a 400."""
    schema = req.constraint_schema() if req is not None else None
    if schema is None:
        return current
    if current is not None:
        raise OpenAIError("a forced tool_choice generates under its own schema: drop 'response_format' / "
                          "'structured_outputs', or use tool_choice \"auto\"", param="tool_choice")
    from engine.structured_output.params import StructuredOutputsParams

    params = StructuredOutputsParams(json=schema, disable_any_whitespace=True)  # compact: no whitespace loops
    params._param = "tools"
    return params


def render_offline(tokenizer: Any, conversation: list[dict], chat_template: str | None, add_generation_prompt: bool,
                   tools: list[dict] | None, **kwargs: Any) -> tuple[str, list[int]]:
    """``LLM.chat(..., tools=...)``: the same checks as the server (tools, tool messages, a
    template that renders tools), raised as ValueError naming the field."""
    from engine.entrypoints.chat_utils import render_chat_prompt

    try:
        req = parse_tools({"tools": tools, "tool_choice": "none"}, ToolOptions()) if tools is not None else None
        call_ids: set[str] = set()
        messages = []
        for i, m in enumerate(conversation):
            out = dict(m)
            if isinstance(m, dict):
                message_tool_fields(m, f"messages[{i}]", out, call_ids)
            messages.append(out)
    except OpenAIError as e:
        raise ValueError(e.message) from None
    extra = dict(kwargs.pop("chat_template_kwargs", None) or {})

    def render(t: list[dict] | None) -> tuple[str, list[int]]:
        kw = {**extra, "tools": t} if t else extra
        return render_chat_prompt(tokenizer, messages, chat_template, add_generation_prompt,
                                  chat_template_kwargs=kw, **kwargs)

    got = render(req.tools if req else None)
    if req is not None and got == render(None):
        raise ValueError("the chat template does not render 'tools'; pass chat_template=... (a tool-capable "
                         f"template such as {HERMES_TEMPLATE})")
    return got
