"""What a chat choice's generated text becomes: reasoning (``--reasoning-parser``), then content and
tool calls (a forced-call parser, or ``--tool-call-parser`` for ``tool_choice="auto"``).

One ``ChoiceParser`` per choice, made when the request starts. Streaming feeds it the accumulated
text and sends what changed; the final message is the full-text parse of the same text. Both
parsers promise that a partial parse is a prefix of the full one (tool_parsers/base.py), so the
streamed deltas always assemble to the non-streamed message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.entrypoints.openai.reasoning import ReasoningParser, get_reasoning_parser
from engine.entrypoints.openai.tool_parsers import ToolCallStreamer, ToolParser, get_tool_parser
from engine.entrypoints.openai.tool_parsers.json_parsers import NamedToolParser, RequiredToolParser
from engine.entrypoints.openai.tools import ToolOptions, ToolRequest


@dataclass
class ChoiceParser:
    reasoning: ReasoningParser | None
    tools: ToolParser | None
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0
    streamer: ToolCallStreamer | None = None
    called: bool = False  # a tool call was parsed
    answer_at: int = -1  # once the reasoning is over: where the answer starts in the text (fixed for good)
    reasoning_text: str = ""

    def __post_init__(self) -> None:
        if self.tools is not None:
            self.streamer = ToolCallStreamer(self.tools)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.reasoning is None:
            return "", text
        split = self.reasoning.parse(text, final)
        return split.reasoning, split.content

    def _split_streaming(self, final: bool) -> tuple[str, str]:
        if self.reasoning is None:
            return "", self.text
        if self.answer_at < 0:
            split = self.reasoning.parse(self.text, final)
            if not split.ended:
                return split.reasoning, split.content
            self.answer_at, self.reasoning_text = len(self.text) - len(split.content), split.reasoning
        return self.reasoning_text, self.text[self.answer_at:]

    def step(self, delta_text: str, final: bool) -> list[dict]:
        """The deltas (``reasoning_content`` / ``content`` / one ``tool_calls`` entry each) that the
        new text settles, in the order they must be sent."""
        self.text += delta_text
        reasoning, answer = self._split_streaming(final)
        deltas: list[dict] = []
        if len(reasoning) > self.sent_reasoning:
            deltas.append({"reasoning_content": reasoning[self.sent_reasoning:]})
            self.sent_reasoning = len(reasoning)
        if self.streamer is None:
            if len(answer) > self.sent_content:
                deltas.append({"content": answer[self.sent_content:]})
                self.sent_content = len(answer)
            return deltas
        for part in self.streamer.step(answer, final).parts:
            if "content" in part:
                deltas.append(part)
            else:
                self.called = True
                deltas.append({"tool_calls": [part["tool_call"]]})
        return deltas

    def message(self, text: str) -> dict:
        """The non-streamed message fields of a finished choice."""
        reasoning, answer = self._split(text, True)
        msg: dict = {}
        if self.reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        if self.streamer is None:
            msg["content"] = answer
            return msg
        parsed = self.tools.parse(answer, True)
        calls = self.streamer.final_calls(parsed)
        self.called = bool(calls)
        msg["content"] = parsed.content if parsed.content or not calls else None
        if calls:
            msg["tool_calls"] = calls
        return msg

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason


@dataclass(frozen=True)
class ChatOutputParsing:
    """Chosen once per request: which parsers its choices get (None: plain text, as before)."""

    options: ToolOptions
    tools: ToolRequest | None = None
    tokenizer: object = field(default=None, compare=False)

    @property
    def first_content(self) -> str | None:
        """The role delta's content: null where tool calls may come (as OpenAI sends it), so a
        reply with calls and no text assembles to content null, as the non-streamed one has."""
        return None if self._tool_parser_class() is not None else ""

    @property
    def active(self) -> bool:
        return self._tool_parser_class() is not None or self._reasoning_class() is not None

    def _tool_parser_class(self):
        t = self.tools
        if t is None or t.choice == "none":
            return None
        if t.choice == "named":
            return lambda tok: NamedToolParser(t.named, tok)
        if t.choice == "required":
            return lambda tok: RequiredToolParser(tok)
        return get_tool_parser(self.options.tool_call_parser)

    def _reasoning_class(self):
        # a constraint starts after the reasoning (reasoning/constraint.py), so constrained outputs split too
        if self.options.reasoning_parser is None:
            return None
        return get_reasoning_parser(self.options.reasoning_parser)

    def choice_parser(self) -> ChoiceParser | None:
        if not self.active:
            return None
        tool_cls, reasoning_cls = self._tool_parser_class(), self._reasoning_class()
        return ChoiceParser(reasoning_cls(self.tokenizer) if reasoning_cls else None,
                            tool_cls(self.tokenizer) if tool_cls else None)
