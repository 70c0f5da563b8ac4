"""The tool-call parser interface, its registry, and the one streaming algorithm all parsers share.

A parser has a single job: ``parse(text, final)``. With ``final=True`` it is the full-text parse of a
finished output. With ``final=False`` it returns only what no continuation of ``text`` can change:
content that cannot turn out to be part of a call (a suffix that might start a tag is held back),
the calls already complete, and at most one *open* call whose name is settled and whose arguments
may still grow (only where a parser can promise they will only grow).

Streaming is then correct by construction (``ToolCallStreamer``): each step parses the accumulated
text and sends the difference from what was already sent. A parser honours the contract when, for
every prefix ``p`` of a text ``t``, ``parse(p, False)`` is a prefix of ``parse(t, True)`` (content
a prefix of the content, calls a prefix of the calls, an open call's arguments a prefix of that
call's arguments); the property tests check exactly this for every registered parser.
"""
from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's ``function.arguments``
    # how much of the content comes before this call: APIs with ordered blocks (Anthropic's,
    # the Responses API) interleave text and calls by it, the same streamed or not
    offset: int = field(default=0, compare=False)


@dataclass
class ParsedOutput:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    # streaming only: the last call's arguments may still grow
    last_call_open: bool = False
    # a point where parsing starts afresh (hermes: after a closed block): for every continuation of
    # the text, the parse is that of text[:checkpoint] followed by that of the rest. With it the
    # streamer parses only from the last checkpoint on, not the whole text at every step.
    checkpoint: int = 0
    checkpoint_content: int = 0  # len(content) and len(calls) at the checkpoint
    checkpoint_calls: int = 0


class ToolParser(ABC):
    """Turns model text into content and tool calls (see the module docstring for the contract)."""

    name: ClassVar[str] = ""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput: ...


# ---- registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    def wrap(cls: type[ToolParser]) -> type[ToolParser]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def tool_parser_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as ``name`` (vLLM's ``--tool-call-parser`` names)."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {sorted(_REGISTRY)}") from None


def _load_builtin() -> None:
    from engine.entrypoints.openai.tool_parsers import hermes, json_parsers, pythonic  # noqa: F401


# ---- helpers parsers share ---------------------------------------------------------------------
def held_back(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``: text a
    stream must not send yet, since the next characters may complete the tag."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """``{"name": str, "arguments": {...}}`` (or ``parameters``) as a call; anything else is None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    keys = [k for k in args_keys if k in obj]
    if len(keys) > 1 or set(obj) - {"name", *keys}:
        return None
    args = obj[keys[0]] if keys else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


# ---- streaming ---------------------------------------------------------------------------------
@dataclass
class StreamDelta:
    # in the order they must be sent: {"content": str} or {"tool_call": OpenAI delta.tool_calls entry}
    parts: list[dict] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(p["content"] for p in self.parts if "content" in p)

    @property
    def tool_calls(self) -> list[dict]:
        return [p["tool_call"] for p in self.parts if "tool_call" in p]


@dataclass
class ToolCallStreamer:
    """Sends the difference between successive parses of the accumulated text. A call's first
    delta carries its index, id and name (arguments ""), later ones pieces of the arguments."""

    parser: ToolParser
    ids: list[str] = field(default_factory=list)
    sent_content: int = 0
    sent_args: list[int] = field(default_factory=list)
    # what lies before the last checkpoint: its text length, content and calls, settled for good
    base_pos: int = 0
    base_content: str = ""
    base_calls: list[ToolCall] = field(default_factory=list)

    def _parse(self, text: str, final: bool) -> ParsedOutput:
        sub = self.parser.parse(text[self.base_pos:] if self.base_pos else text, final)
        if not self.base_pos:
            parsed = sub
        else:
            shift = len(self.base_content)
            parsed = ParsedOutput(self.base_content + sub.content,
                                  self.base_calls + [replace(c, offset=c.offset + shift) for c in sub.calls],
                                  sub.last_call_open)
        if sub.checkpoint:
            self.base_content = parsed.content[:len(self.base_content) + sub.checkpoint_content]
            self.base_calls = parsed.calls[:len(self.base_calls) + sub.checkpoint_calls]
            self.base_pos += sub.checkpoint
        return parsed

    def step(self, text: str, final: bool) -> StreamDelta:
        parsed = self._parse(text, final)
        out = StreamDelta()

        def content_to(end: int) -> None:
            if end > self.sent_content:
                out.parts.append({"content": parsed.content[self.sent_content:end]})
                self.sent_content = end

        for i, call in enumerate(parsed.calls):
            if i >= len(self.ids):
                content_to(call.offset)  # the text before a new call goes first
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                out.parts.append({"tool_call": {"index": i, "id": self.ids[i], "type": "function",
                                                "function": {"name": call.name, "arguments": ""}}})
            piece = call.arguments[self.sent_args[i]:]
            if piece:
                out.parts.append({"tool_call": {"index": i, "function": {"arguments": piece}}})
                self.sent_args[i] = len(call.arguments)
        content_to(len(parsed.content))
        return out

    def final_calls(self, parsed: ParsedOutput) -> list[dict]:
        """OpenAI ``message.tool_calls`` for a full parse (ids of calls already streamed kept)."""
        while len(self.ids) < len(parsed.calls):
            self.ids.append(new_call_id())
        return [{"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(parsed.calls)]
