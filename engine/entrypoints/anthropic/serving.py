"""POST /v1/messages: generation through the chat machinery (template, tools, forced calls,
reasoning), answered as Anthropic's Message or its event stream::

    message_start, (content_block_start, content_block_delta..., content_block_stop)...,
    message_delta (stop_reason, usage), message_stop

Blocks come from the same ChoiceParser deltas the chat endpoint streams, so a streamed message
assembles to exactly the non-streamed one. Every failure is Anthropic's error shape."""
from __future__ import annotations

import json
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine.entrypoints.anthropic.errors import anthropic_error_response, error_body
from engine.entrypoints.anthropic.protocol import parse_messages_request
from engine.entrypoints.openai.chat_generation import ChatRequest, start_chat_generation
from engine.entrypoints.openai.chat_output import ChoiceParser
from engine.entrypoints.openai.protocol import Body, OpenAIError, random_id
from engine.entrypoints.openai.serving_engine import OpenAIServing, json_response
from engine.core.engine_client import QueueFullError
from engine.entrypoints.openai.error_body import RateLimitError
from engine.errors import EngineDeadError

logger = logging.getLogger(__name__)


def _tool_id(openai_id: str) -> str:
    return "toolu_" + openai_id.rsplit("-", 1)[-1]


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n".encode()


def stop_reason(finish: str | None, stop: Any, called: bool) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for an engine finish."""
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return ("tool_use" if called else "end_turn"), None


@dataclass
class _Blocks:
    """The content blocks, built from parser deltas the same way streamed or not: a change of kind
    closes the open block and opens the next. Returns the events announcing each change."""

    kind: str | None = None
    index: int = -1
    content: list[dict] = field(default_factory=list)
    partial_json: list[str] = field(default_factory=list)

    def open(self, kind: str, block: dict) -> list[bytes]:
        out = self.close()
        self.kind, self.index = kind, self.index + 1
        self.content.append(dict(block))
        self.partial_json.append("")
        out.append(_event("content_block_start", {"index": self.index, "content_block": block}))
        return out

    def final_content(self) -> list[dict]:
        for block, args in zip(self.content, self.partial_json):
            if block["type"] == "tool_use":
                try:
                    block["input"] = json.loads(args) if args else {}
                except ValueError:  # a call cut by max_tokens
                    block["input"] = {}
        return self.content

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"index": self.index})]

    def delta(self, delta: dict) -> bytes:
        block = self.content[self.index]
        if delta["type"] == "text_delta":
            block["text"] += delta["text"]
        elif delta["type"] == "thinking_delta":
            block["thinking"] += delta["thinking"]
        else:
            self.partial_json[self.index] += delta["partial_json"]
        return _event("content_block_delta", {"index": self.index, "delta": delta})


class AnthropicServingMessages(OpenAIServing):
    max_temperature = 1.0  # Anthropic's range

    async def handle(self, request: web.Request, read_json: Callable[[web.Request], Awaitable[Any]],
                     check_body: Callable[[Any], None]) -> web.StreamResponse:
        """Every error, from the body read on, in Anthropic's shape."""
        try:
            data = await read_json(request)
            check_body(data)
            return await self.create_message(request, data)
        except OpenAIError as e:
            return anthropic_error_response(e)
        except EngineDeadError as e:
            return anthropic_error_response(OpenAIError(str(e) or "the engine is not running", status=503))
        except QueueFullError as e:
            return anthropic_error_response(RateLimitError(str(e), code="queue_full"))

    async def create_message(self, request: web.Request, data: Any) -> web.StreamResponse:
        body = Body(data)
        model = self.check_model(body)
        req = parse_messages_request(data)
        request_id = random_id("msg").replace("msg-", "msg_")
        gen = await start_chat_generation(
            self, ChatRequest(req.messages, req.tools, req.max_tokens, req.sampling), request_id, req.stream, model)
        streams, cp, ids = gen.streams, gen.parser, gen.prompt_tokens
        head = {"id": request_id, "type": "message", "role": "assistant", "model": model}
        try:
            if req.stream:
                return await self._stream(request, streams, cp, head, ids)
            out = (await self.final_outputs(streams))[0].outputs[0]
            if out.finish_reason == "error":
                raise OpenAIError(f"generation failed: {out.stop_reason}", status=500, type="api_error")
            blocks = _Blocks()
            for d in cp.step(out.text, True):  # the blocks a stream of this text would build
                self._block_events(blocks, d)
            content = blocks.final_content()
            reason, seq = stop_reason(out.finish_reason, out.stop_reason, cp.called)
            return json_response({**head, "content": content, "stop_reason": reason, "stop_sequence": seq,
                                  "usage": {"input_tokens": ids, "output_tokens": len(out.token_ids)}})
        finally:
            self.abort_unfinished(streams)

    async def _stream(self, request: web.Request, streams: list, cp: ChoiceParser, head: dict,
                      prompt_tokens: int) -> web.StreamResponse:
        resp = await self.start_sse(request)
        blocks = _Blocks()
        output_tokens = 0
        try:
            await resp.write(_event("message_start", {"message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}))
            finish, stop = None, None
            async with aclosing(self.merged(streams)) as outputs:
                async for _, out in outputs:
                    o = out.outputs[0]
                    output_tokens += len(o.token_ids)
                    finish, stop = o.finish_reason, o.stop_reason
                    if finish == "error":
                        raise OpenAIError(f"generation failed: {stop}", status=500)
                    events: list[bytes] = []
                    for d in cp.step(o.text, finish is not None):
                        events += self._block_events(blocks, d)
                    if events:
                        await resp.write(b"".join(events))
            reason, seq = stop_reason(finish, stop, cp.called)
            await resp.write(b"".join(blocks.close()) + _event(
                "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                  "usage": {"output_tokens": output_tokens}}) + _event("message_stop", {}))
        except ConnectionResetError:  # the client went away: the caller aborts what is left
            pass
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band, as Anthropic does
            if not isinstance(e, OpenAIError):
                logger.exception("streaming %s failed", head["id"])
            body = error_body(500, str(e.message if isinstance(e, OpenAIError) else "internal error"))
            try:
                await resp.write(f"event: error\ndata: {json.dumps(body)}\n\n".encode())
            except ConnectionResetError:
                pass
        return resp

    @staticmethod
    def _block_events(blocks: _Blocks, d: dict) -> list[bytes]:
        out: list[bytes] = []
        if "reasoning_content" in d:
            if blocks.kind != "thinking":
                out += blocks.open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(blocks.delta({"type": "thinking_delta", "thinking": d["reasoning_content"]}))
        elif "content" in d:
            if blocks.kind != "text":
                out += blocks.open("text", {"type": "text", "text": ""})
            out.append(blocks.delta({"type": "text_delta", "text": d["content"]}))
        else:
            tc = d["tool_calls"][0]
            if "id" in tc:
                out += blocks.open("tool_use", {"type": "tool_use", "id": _tool_id(tc["id"]),
                                                "name": tc["function"]["name"], "input": {}})
            elif tc["function"]["arguments"]:
                out.append(blocks.delta({"type": "input_json_delta", "partial_json": tc["function"]["arguments"]}))
        return out
