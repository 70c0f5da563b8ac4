"""POST /v1/responses (OpenAI's Responses API, the stateless part plus a bounded store) and
GET /v1/responses/{id}.

The input (a string or a list of items: messages, ``function_call``, ``function_call_output``)
becomes chat messages; generation is the chat endpoint's (chat_generation.py), and the
ChoiceParser deltas become output items and typed SSE events. ``store`` keeps a response's
conversation (input and output items) in an in-memory LRU of ``max_stored_responses`` entries;
``previous_response_id`` continues one, and an unknown or evicted id is a 404.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.entrypoints.openai.chat_generation import ChatRequest, start_chat_generation
from engine.entrypoints.openai.chat_output import ChoiceParser
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int
from engine.entrypoints.openai.serving_engine import OpenAIServing, json_response, write_quietly
from engine.errors import EngineDeadError
from engine.structured_output.params import InvalidGrammarError, StructuredOutputsParams

logger = logging.getLogger(__name__)
MESSAGE_ROLES = ("user", "assistant", "system", "developer")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponseStore:
    """Bounded LRU: response id -> (the response object, its conversation as chat messages)."""

    capacity: int = 1024
    items: OrderedDict = field(default_factory=OrderedDict)

    def put(self, rid: str, response: dict, conversation: list[dict]) -> None:
        self.items[rid] = (response, conversation)
        self.items.move_to_end(rid)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]]:
        got = self.items.get(rid)
        if got is None:
            raise OpenAIError(f"Previous response with id '{rid}' not found (unknown, not stored, or evicted from "
                              f"the server's store of the last {self.capacity} responses)", status=404,
                              param="previous_response_id", code="previous_response_not_found")
        self.items.move_to_end(rid)
        return got


def _content_text(content: Any, p: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(f"'{p}' must be a string or a list of content parts", param=p)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise OpenAIError(f"'{p}[{j}]' must be an input_text part; {kind!r} parts are not supported",
                              param=f"{p}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(raw: Any) -> list[dict]:
    """The ``input`` field as chat messages (function calls as an assistant's tool_calls)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise OpenAIError("'input' must be a string or a non-empty array of input items", param="input")
    out: list[dict] = []
    for i, item in enumerate(raw):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise OpenAIError(f"'{p}' must be an object", param=p)
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in MESSAGE_ROLES:
                raise OpenAIError(f"'{p}.role' must be one of {list(MESSAGE_ROLES)}", param=f"{p}.role")
            out.append({"role": item["role"], "content": _content_text(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            for k in ("call_id", "name", "arguments"):
                if not isinstance(item.get(k), str):
                    raise OpenAIError(f"'{p}.{k}' is a required string", param=f"{p}.{k}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("_calls_only"):
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call], "_calls_only": True})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise OpenAIError(f"'{p}' needs a string 'call_id' and 'output'", param=p)
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again
        else:
            raise OpenAIError(f"'{p}.type' {kind!r} is not supported (message, function_call, "
                              "function_call_output)", param=f"{p}.type")
    for m in out:
        m.pop("_calls_only", None)
    return out


def _tool_fields(body: Body) -> dict | None:
    tools, choice = body.raw("tools"), body.raw("tool_choice")
    if tools is None and choice is None:
        return None
    mapped_tools = None
    if tools is not None:
        if not isinstance(tools, list):
            raise OpenAIError("'tools' must be an array", param="tools")
        mapped_tools = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                raise OpenAIError(f"'tools[{i}].type' must be 'function' (only function tools are supported)",
                                  param=f"tools[{i}].type")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            mapped_tools.append({"type": "function", "function": fn})
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": mapped_tools, "tool_choice": choice, "parallel_tool_calls": body.raw("parallel_tool_calls")}


def _text_format(body: Body) -> StructuredOutputsParams | None:
    text = body.obj("text")
    fmt = text.obj("format") if text is not None else None
    if fmt is None:
        return None
    kind = fmt.raw("type", "text")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            schema = fmt.raw("schema")
            if not isinstance(schema, dict):
                raise OpenAIError("'text.format.schema' is a required JSON schema object", param="text.format.schema")
            params = StructuredOutputsParams(json=schema)
            params._param = "text.format.schema"
            return params
    except InvalidGrammarError as e:
        raise OpenAIError(str(e), param="text.format") from None
    raise OpenAIError(f"'text.format.type' must be text, json_object or json_schema, got {kind!r}",
                      param="text.format.type")


class OpenAIServingResponses(OpenAIServing):
    max_temperature = 2.0

    def __init__(self, *args: Any, store_capacity: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = ResponseStore(store_capacity)

    def retrieve(self, rid: str) -> web.Response:
        got = self.store.items.get(rid)
        if got is None:
            raise OpenAIError(f"Response with id '{rid}' not found", status=404, code="not_found")
        return json_response(got[0])

    async def create_response(self, request: web.Request, data: Any) -> web.StreamResponse:
        body = Body(data)
        model = self.check_model(body)
        conversation: list[dict] = []
        prev = body.str("previous_response_id")
        if prev is not None:
            conversation = list(self.store.get(prev)[1])
        new_input = input_messages(body.required("input"))
        instructions = body.str("instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation + new_input
        stream = body.bool("stream", False)
        store = body.bool("store", True)
        max_tokens = body.int("max_output_tokens", None, lo=1)
        sampling = dict(temperature=body.float("temperature", 1.0, lo=0.0, hi=self.max_temperature),
                        top_p=body.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True))
        body.raw("metadata")
        rid = _id("resp")
        gen = await start_chat_generation(self, ChatRequest(messages, _tool_fields(body), max_tokens, sampling,
                                                            _text_format(body), "max_output_tokens"), rid, stream,
                                        model)
        head = {"id": rid, "object": "response", "created_at": now_int(), "model": model,
                "instructions": instructions, "max_output_tokens": max_tokens,
                "temperature": sampling["temperature"], "top_p": sampling["top_p"],
                "tools": body.raw("tools", []), "tool_choice": body.raw("tool_choice", "auto"),
                "parallel_tool_calls": body.raw("parallel_tool_calls", True),
                "text": body.raw("text", {"format": {"type": "text"}}), "previous_response_id": prev,
                "store": store, "metadata": body.raw("metadata", {}), "error": None}
        run = _Run(head, gen.parser, gen.prompt_tokens)
        try:
            if stream:
                return await self._stream(request, gen.streams, run, conversation + new_input, store)
            out = (await self.final_outputs(gen.streams))[0].outputs[0]
            run.finish(out.text, out.finish_reason, len(out.token_ids))
            response = run.response("completed")
            if store:
                self.store.put(rid, response, conversation + new_input + run.as_messages())
            return json_response(response)
        finally:
            self.abort_unfinished(gen.streams)

    async def _stream(self, request: web.Request, streams: list, run: "_Run", conversation: list[dict],
                      store: bool) -> web.StreamResponse:
        resp = await self.start_sse(request)
        try:
            await resp.write(run.event("response.created", response=run.response("in_progress")))
            await resp.write(run.event("response.in_progress", response=run.response("in_progress")))
            async with aclosing(self.merged(streams)) as outputs:
                async for _, out in outputs:
                    o = out.outputs[0]
                    run.output_tokens += len(o.token_ids)
                    events = b"".join(run.stream_step(o.text, o.finish_reason))
                    if events:
                        await resp.write(events)
            response = run.response("completed")
            if store:
                self.store.put(run.head["id"], response, conversation + run.as_messages())
            await resp.write(run.event("response.completed", response=response))
        except ConnectionResetError:
            pass
        except Exception as e:  # noqa: BLE001 - headers are out: an error event, as OpenAI sends one
            if not isinstance(e, (OpenAIError, EngineDeadError)):
                logger.exception("streaming %s failed", run.head["id"])
            await write_quietly(resp, run.event("error", code="server_error", message=str(e), param=None))
        return resp


@dataclass
class _Run:
    """One response being built: output items from the parser's deltas, streamed or at the end."""

    head: dict
    parser: ChoiceParser
    prompt_tokens: int
    output_tokens: int = 0
    items: list[dict] = field(default_factory=list)
    open_kind: str | None = None
    seq: int = 0
    incomplete: bool = False
    call_ids: dict[int, int] = field(default_factory=dict)  # tool call index -> output index

    def event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        payload = json.dumps({"type": kind, "sequence_number": self.seq - 1, **data}, ensure_ascii=False)
        return f"event: {kind}\ndata: {payload}\n\n".encode()

    def response(self, status: str) -> dict:
        if status == "completed" and self.incomplete:
            status = "incomplete"
        items = [dict(i) for i in self.items] if status != "in_progress" else []
        return {**self.head, "status": status, "output": items,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": None if status == "in_progress" else {
                    "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.prompt_tokens + self.output_tokens}}

    # ---- items -----------------------------------------------------------------------------------
    def _open(self, kind: str) -> tuple[list[bytes], dict]:
        out = self._close()
        if kind == "message":
            item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [], "content": []}
        else:
            item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": "", "arguments": "",
                    "status": "in_progress"}
        self.items.append(item)
        self.open_kind = kind
        return out, item

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        i, item = len(self.items) - 1, self.items[-1]
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out += [self.event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                               part=part)]
        elif item["type"] == "reasoning":
            out.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                                  text=item["content"][0]["text"]))
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  name=item["name"], arguments=item["arguments"]))
        if "status" in item:
            item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=i, item=item))
        self.open_kind = None
        return out

    def _apply(self, d: dict) -> list[bytes]:
        """One parser delta into the items; the events announcing it."""
        out: list[bytes] = []
        if "tool_calls" in d:
            tc = d["tool_calls"][0]
            if "id" in tc:
                out, item = self._open("function_call")
                item["name"] = tc["function"]["name"]
                self.call_ids[tc["index"]] = len(self.items) - 1
                out.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item)))
            else:
                i = self.call_ids[tc["index"]]
                piece = tc["function"]["arguments"]
                self.items[i]["arguments"] += piece
                out.append(self.event("response.function_call_arguments.delta", item_id=self.items[i]["id"],
                                      output_index=i, delta=piece))
            return out
        kind, text = ("reasoning", d["reasoning_content"]) if "reasoning_content" in d else ("message", d["content"])
        if self.open_kind != kind:
            out, item = self._open(kind)
            i = len(self.items) - 1
            out.append(self.event("response.output_item.added", output_index=i, item=json.loads(json.dumps(item))))
            if kind == "message":
                item["content"].append({"type": "output_text", "text": "", "annotations": []})
                out.append(self.event("response.content_part.added", item_id=item["id"], output_index=i,
                                      content_index=0, part=dict(item["content"][0])))
            else:
                item["content"].append({"type": "reasoning_text", "text": ""})
        i, item = len(self.items) - 1, self.items[-1]
        item["content"][0]["text"] += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        out.append(self.event(name, item_id=item["id"], output_index=i, content_index=0, delta=text, **extra))
        return out

    def stream_step(self, text: str, finish: str | None) -> list[bytes]:
        out: list[bytes] = []
        for d in self.parser.step(text, finish is not None):
            out += self._apply(d)
        if finish is not None:
            self.incomplete = finish == "length"
            out += self._close()
        return out

    def finish(self, text: str, finish: str | None, output_tokens: int) -> None:
        """The non-streamed path: the same items from one step over the whole text."""
        self.output_tokens = output_tokens
        self.stream_step(text, finish or "stop")

    def as_messages(self) -> list[dict]:
        """The output as chat messages, for a later previous_response_id."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        msg: dict = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        return [msg]
