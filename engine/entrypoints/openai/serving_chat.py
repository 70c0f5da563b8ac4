"""POST /v1/chat/completions."""
from __future__ import annotations

import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.entrypoints.chat_utils import render_chat
from engine.entrypoints.openai.chat_output import ChatOutputParsing, ChoiceParser
from engine.entrypoints.openai.reasoning.constraint import constraint_after_reasoning
from engine.entrypoints.openai.tools import forced_constraint, message_tool_fields, parse_tools, render_with_tools
from engine.errors import EngineDeadError
from engine.outputs import Logprob, RequestOutput
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int, random_id
from engine.entrypoints.openai.serving_beam_search import beam_search_params, run_beam_search
from engine.entrypoints.openai.serving_engine import (
    MIN_LOGPROB, SSE_DONE, OpenAIServing, clamp_logprob, engine_dead_error, error_response, json_response, sse,
    write_quietly,
)

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass
class _Ctx:
    request_id: str
    created: int
    model: str
    n: int
    top_logprobs: int | None  # None: no logprobs
    prompt_tokens: int
    parsing: ChatOutputParsing | None = None  # reasoning / tool-call parsing of the output


def _content_text(content: Any, param: str) -> str:
    """A message's content as text: a string, or an array of text parts (joined with newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OpenAIError(f"'{param}[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                  f"{kind!r} parts are not supported", param=f"{param}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise OpenAIError(f"'{param}' must be a string or an array of content parts", param=param)


def parse_messages(body: Body) -> list[dict]:
    raw = body.required("messages")
    if not isinstance(raw, list):
        raise OpenAIError("'messages' must be an array of message objects", param="messages")
    if not raw:
        raise OpenAIError("'messages' must contain at least one message", param="messages")
    out = []
    call_ids: set[str] = set()  # tool calls of earlier assistant messages, for tool_call_id
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise OpenAIError(f"'{p}' must be an object", param=p)
        role = m.get("role")
        if role not in ROLES:
            raise OpenAIError(f"'{p}.role' must be one of {list(ROLES)}, got {role!r}", param=f"{p}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise OpenAIError(f"'{p}.content' is a required property", param=f"{p}.content")
            content = ""
        out.append({"role": role, "content": _content_text(content, f"{p}.content")})
        message_tool_fields(m, p, out[-1], call_ids)
    return out


class OpenAIServingChat(OpenAIServing):
    max_temperature = 2.0  # OpenAI's range for chat

    async def create_chat_completion(self, request: web.Request, data: Any) -> web.StreamResponse:
        body = Body(data)
        model = self.check_model(body)
        messages = parse_messages(body)
        tool_req = parse_tools(body.data, self.config.tool_options)
        stream = body.bool("stream", False)
        include_usage, continuous_usage = body.stream_options(stream)
        logprobs = body.bool("logprobs", False)
        top_logprobs = body.int("top_logprobs", None, lo=0, hi=self.config.max_logprobs)
        if top_logprobs is not None and top_logprobs > 0 and not logprobs:
            raise OpenAIError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        max_tokens = body.int("max_completion_tokens", None, lo=1)
        if max_tokens is None:
            max_tokens = body.int("max_tokens", None, lo=1)
        kw = self.sampling_kwargs(body)
        kw["structured_outputs"] = constraint_after_reasoning(
            self.config.tool_options.reasoning_parser, forced_constraint(tool_req, kw["structured_outputs"]))
        add_generation_prompt = body.bool("add_generation_prompt", True)
        priority = body.int("priority", 0)

        def render(tools: list[dict] | None) -> list[int]:
            extra = {"chat_template_kwargs": {"tools": tools}} if tools else {}
            return render_chat(self.tokenizer, messages, self.config.chat_template, add_generation_prompt,
                               **self.config.chat_options, **extra)

        try:
            ids = await self.in_tokenizer_thread(
                lambda: render_with_tools(render, tool_req), size=sum(len(m["content"]) for m in messages),
            )
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        max_tokens = self.check_length(len(ids), max_tokens, "messages")
        if body.bool("use_beam_search", False):  # vLLM's extra field: n is the beam width
            bp = beam_search_params(body, self.make_params(max_tokens=max_tokens, logprobs=(top_logprobs or 0)
                                                           if logprobs else None, **{**kw, "n": 1}), kw["n"], stream)
            rid = random_id("chatcmpl")
            outs = await run_beam_search(self, [ids], bp, rid)
            return json_response(self._full_response(outs[0], _Ctx(rid, now_int(), model, bp.beam_width, None,
                                                                   len(ids))))
        params = self.make_params(max_tokens=max_tokens, logprobs=(top_logprobs or 0) if logprobs else None, **kw)
        request_id = random_id("chatcmpl")
        inputs = await self.process_inputs([{"prompt_token_ids": ids}], params, "messages")
        streams = await self.add_all(request_id, inputs, stream, priority, lora_request=self.lora_request_for(model))
        parsing = ChatOutputParsing(self.config.tool_options, tool_req, self.tokenizer)
        ctx = _Ctx(request_id, now_int(), model, params.n, (top_logprobs or 0) if logprobs else None, len(ids),
                   parsing if parsing.active else None)
        try:
            if stream:
                return await self._stream(request, streams, ctx, include_usage, continuous_usage)
            try:
                outs = await self.final_outputs(streams)
            except EngineDeadError as e:
                return error_response(engine_dead_error(e, status=500))
            return json_response(self._full_response(outs[0], ctx))
        finally:
            self.abort_unfinished(streams)

    # ---- formatting ------------------------------------------------------------------------
    def _entry(self, tid: int, lp: Logprob | None) -> dict:
        s = lp.decoded_token if lp is not None and lp.decoded_token is not None else self.tokenizer.decode([tid])
        return {"token": s, "logprob": clamp_logprob(lp.logprob) if lp is not None else MIN_LOGPROB,
                "bytes": self.token_bytes(tid, s)}

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]] | None, k: int | None) -> dict | None:
        if k is None:
            return None
        content = []
        for tid, entry in zip(token_ids, entries or [{}] * len(token_ids)):
            item = self._entry(tid, entry.get(tid))
            ranked = sorted(((v.rank if v.rank is not None else 1 << 30, t, v) for t, v in entry.items()),
                            key=lambda x: x[0])
            seen, top = set(), []
            for _, t, v in ranked:
                if len(top) >= k:
                    break
                if t not in seen:
                    seen.add(t)
                    top.append(self._entry(t, v))
            item["top_logprobs"] = top
            content.append(item)
        return {"content": content}

    def _full_response(self, out: RequestOutput, ctx: _Ctx) -> dict:
        choices = []
        for o in out.outputs:
            cp = ctx.parsing.choice_parser() if ctx.parsing is not None else None
            choices.append({
                "index": o.index,
                "message": {"role": self.config.response_role, **(cp.message(o.text) if cp else {"content": o.text})},
                "logprobs": self._logprobs(o.token_ids, o.logprobs, ctx.top_logprobs),
                "finish_reason": cp.finish_reason(o.finish_reason) if cp else o.finish_reason,
            })
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        return {
            "id": ctx.request_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": ctx.prompt_tokens + completion_tokens},
        }

    @staticmethod
    def _deltas(parsers: dict[int, ChoiceParser], ctx: _Ctx, index: int, text: str,
                finish: str | None) -> tuple[list[dict], str | None]:
        """The deltas one output of a choice becomes (at least one), and its finish reason."""
        if ctx.parsing is None:
            return [{"content": text} if text or not finish else {}], finish
        cp = parsers.get(index)
        if cp is None:
            cp = parsers[index] = ctx.parsing.choice_parser()
        return cp.step(text, finish is not None) or [{}], cp.finish_reason(finish)

    async def _stream(self, request: web.Request, streams: list, ctx: _Ctx, include_usage: bool,
                      continuous_usage: bool) -> web.StreamResponse:
        resp = await self.start_sse(request)
        completion_tokens = 0
        finished: set[int] = set()
        parsers: dict[int, ChoiceParser] = {}

        def usage() -> dict:
            return {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": ctx.prompt_tokens + completion_tokens}

        def chunk(choices: list[dict], usage_value: Any = None) -> bytes:
            c = {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
                 "model": ctx.model, "choices": choices}
            if include_usage:
                c["usage"] = usage_value
            return sse(c)

        try:
            # the first delta of every choice carries the role, and nothing else (one choice per chunk)
            for i in range(ctx.n):
                await resp.write(chunk([
                    {"index": i, "delta": {"role": self.config.response_role,
                                     "content": ctx.parsing.first_content if ctx.parsing else ""}, "logprobs": None,
                     "finish_reason": None}
                ], usage() if continuous_usage else None))
            async with aclosing(self.merged(streams)) as outputs:
                async for _, out in outputs:
                    for o in out.outputs:
                        if o.index in finished:
                            continue
                        completion_tokens += len(o.token_ids)
                        finish = o.finish_reason
                        if not (o.text or o.token_ids or finish):
                            continue
                        if finish is not None:
                            finished.add(o.index)
                        deltas, finish = self._deltas(parsers, ctx, o.index, o.text, finish)
                        for k, delta in enumerate(deltas):  # the first carries the logprobs, the last the finish
                            await resp.write(chunk([{
                                "index": o.index,
                                "delta": delta,
                                "logprobs": self._logprobs(o.token_ids, o.logprobs, ctx.top_logprobs) if k == 0 else None,
                                "finish_reason": finish if k == len(deltas) - 1 else None,
                            }], usage() if continuous_usage else None))
            if include_usage:
                await resp.write(chunk([], usage()))
            await resp.write(SSE_DONE)
        except EngineDeadError as e:
            await write_quietly(resp, sse(engine_dead_error(e, status=500).to_dict()) + SSE_DONE)
        except ConnectionResetError:  # the client went away: the caller aborts what is left
            pass
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band, as vLLM does
            logger.exception("streaming %s failed", ctx.request_id)
            err = OpenAIError(f"internal error: {e!r}", status=500, type="server_error")
            await write_quietly(resp, sse(err.to_dict()) + SSE_DONE)
        return resp

