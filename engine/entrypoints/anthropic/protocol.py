"""A Messages API request read into what the chat endpoint works with: OpenAI-style chat messages
for the template (``tool_use`` blocks become an assistant's ``tool_calls``, ``tool_result`` blocks
``tool`` messages), OpenAI function tools, and the sampling fields. Every mistake is an
OpenAIError naming the Anthropic field; the serving layer answers it in Anthropic's error shape."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.entrypoints.openai.protocol import Body, OpenAIError

ROLES = ("user", "assistant")


@dataclass
class MessagesRequest:
    messages: list[dict]  # OpenAI chat messages
    tools: dict | None  # {"tools": [...], "tool_choice": ..., "parallel_tool_calls": ...} for parse_tools
    max_tokens: int
    stream: bool
    sampling: dict


def _text_of(content: Any, p: str) -> str:
    """A tool_result's content: a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        out = []
        for j, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise OpenAIError(f"'{p}[{j}]' must be a text block", param=f"{p}[{j}]")
            out.append(b["text"])
        return "\n".join(out)
    raise OpenAIError(f"'{p}' must be a string or a list of text blocks", param=p)


def _system(value: Any) -> str | None:
    if value is None:
        return None
    return _text_of(value, "system")


def _message(m: Any, i: int, seen_tool_ids: set[str]) -> list[dict]:
    p = f"messages[{i}]"
    if not isinstance(m, dict):
        raise OpenAIError(f"'{p}' must be an object", param=p)
    role = m.get("role")
    if role not in ROLES:
        raise OpenAIError(f"'{p}.role' must be one of {list(ROLES)}, got {role!r}", param=f"{p}.role")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise OpenAIError(f"'{p}.content' must be a string or a list of content blocks", param=f"{p}.content")
    texts, calls, results = [], [], []
    for j, b in enumerate(content):
        q = f"{p}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not b["id"] or not isinstance(b.get("name"), str):
                raise OpenAIError(f"'{q}' must have a string 'id' and 'name'", param=q)
            if not isinstance(b.get("input"), dict):
                raise OpenAIError(f"'{q}.input' must be an object", param=f"{q}.input")
            seen_tool_ids.add(b["id"])
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or tid not in seen_tool_ids:
                raise OpenAIError(f"'{q}.tool_use_id' {tid!r} matches no tool_use block of an earlier assistant "
                                  "message", param=f"{q}.tool_use_id")
            text = _text_of(b.get("content"), f"{q}.content")
            if b.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": tid, "content": text})
        else:
            raise OpenAIError(f"'{q}' must be a text block" + (", a tool_use block" if role == "assistant" else
                                                                 ", a tool_result block") +
                              f"; got {kind!r}", param=q)
    text = "\n".join(texts)
    if role == "assistant":
        msg: dict = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        return [msg]
    return results + ([{"role": "user", "content": text}] if texts or not results else [])


def _tools(body: Body) -> dict | None:
    raw = body.raw("tools")
    choice = body.raw("tool_choice")
    if raw is None and choice is None:
        return None
    tools = None
    if raw is not None:
        if not isinstance(raw, list):
            raise OpenAIError("'tools' must be an array", param="tools")
        tools = []
        for i, t in enumerate(raw):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise OpenAIError(f"'tools[{i}]' must be a tool with a 'name' and an 'input_schema'", param=f"tools[{i}]")
            if t.get("type") not in (None, "custom"):
                raise OpenAIError(f"'tools[{i}].type' {t.get('type')!r}: only client tools are supported",
                                  param=f"tools[{i}].type")
            if "input_schema" not in t:
                raise OpenAIError(f"'tools[{i}].input_schema' is a required property", param=f"tools[{i}].input_schema")
            fn = {"name": t["name"], "parameters": t["input_schema"]}
            if t.get("description") is not None:
                fn["description"] = t["description"]
            tools.append({"type": "function", "function": fn})
    parallel = True
    mapped: Any = None
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise OpenAIError("'tool_choice.type' must be one of auto, any, tool, none", param="tool_choice")
        parallel = not choice.get("disable_parallel_tool_use", False)
        kind = choice["type"]
        if kind == "tool":
            if not isinstance(choice.get("name"), str):
                raise OpenAIError("'tool_choice.name' is required with type 'tool'", param="tool_choice.name")
            mapped = {"type": "function", "function": {"name": choice["name"]}}
        else:
            mapped = {"auto": "auto", "any": "required", "none": "none"}[kind]
    return {"tools": tools, "tool_choice": mapped, "parallel_tool_calls": parallel}


def parse_messages_request(data: Any) -> MessagesRequest:
    body = Body(data)
    max_tokens = body.int("max_tokens", None, lo=1)
    if max_tokens is None:
        raise OpenAIError("'max_tokens' is a required property", param="max_tokens")
    raw = body.required("messages")
    if not isinstance(raw, list) or not raw:
        raise OpenAIError("'messages' must be a non-empty array", param="messages")
    messages: list[dict] = []
    system = _system(body.raw("system"))
    if system:
        messages.append({"role": "system", "content": system})
    seen: set[str] = set()
    for i, m in enumerate(raw):
        messages += _message(m, i, seen)
    stop = body.raw("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise OpenAIError("'stop_sequences' must be an array of non-empty strings", param="stop_sequences")
    top_k = body.int("top_k", None, lo=0)
    sampling = dict(
        temperature=body.float("temperature", 1.0, lo=0.0, hi=1.0),
        top_p=body.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=top_k or 0,
        stop=list(stop or []),
    )
    meta = body.obj("metadata")
    if meta is not None:
        meta.str("user_id")
    return MessagesRequest(messages, _tools(body), max_tokens, body.bool("stream", False), sampling)
