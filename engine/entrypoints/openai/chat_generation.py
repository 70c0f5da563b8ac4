"""The part of a chat request the Messages and Responses APIs share with chat completions once
their own fields are read: render the conversation (with tools), fit max_tokens to the context,
build the sampling params (a forced call's schema and the reasoning-aware constraint put in),
submit, and pick the output parser. Each API then formats the same ChoiceParser deltas its way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.core.engine_client import OutputStream
from engine.entrypoints.chat_utils import render_chat
from engine.entrypoints.openai.chat_output import ChatOutputParsing, ChoiceParser
from engine.entrypoints.openai.protocol import Body, OpenAIError
from engine.entrypoints.openai.reasoning.constraint import constraint_after_reasoning
from engine.entrypoints.openai.serving_chat import parse_messages
from engine.entrypoints.openai.serving_engine import OpenAIServing
from engine.entrypoints.openai.tools import ToolRequest, forced_constraint, parse_tools, render_with_tools


@dataclass
class ChatGeneration:
    streams: list[OutputStream]
    parser: ChoiceParser
    prompt_tokens: int


@dataclass
class ChatRequest:
    """An API's request in the chat endpoint's terms (OpenAI chat messages and tool fields)."""

    messages: list[dict]
    tool_fields: dict | None  # {"tools", "tool_choice", "parallel_tool_calls"}, as chat completions takes them
    max_tokens: int | None
    sampling: dict  # SamplingParams keyword arguments
    constraint: Any = None  # StructuredOutputsParams from the API's own format field
    max_tokens_param: str = "max_tokens"


async def start_chat_generation(serving: OpenAIServing, req: ChatRequest, request_id: str,
                                stream: bool, model: str) -> ChatGeneration:
    """Checks, renders and submits; raises OpenAIError (naming the field) before anything runs."""
    messages = parse_messages(Body({"messages": req.messages}))
    options = serving.config.tool_options
    tool_req: ToolRequest | None = parse_tools(req.tool_fields, options) if req.tool_fields else None
    constraint = constraint_after_reasoning(options.reasoning_parser, forced_constraint(tool_req, req.constraint))

    def render(tools: list[dict] | None) -> list[int]:
        extra = {"chat_template_kwargs": {"tools": tools}} if tools else {}
        return render_chat(serving.tokenizer, messages, serving.config.chat_template, True,
                           **serving.config.chat_options, **extra)

    try:
        ids = await serving.in_tokenizer_thread(lambda: render_with_tools(render, tool_req),
                                                size=sum(len(m["content"]) for m in messages))
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from None
    try:
        max_tokens = serving.check_length(len(ids), req.max_tokens, "messages")
    except OpenAIError as e:
        if e.param == "max_tokens":
            e.param = req.max_tokens_param
        raise
    params = serving.make_params(max_tokens=max_tokens, structured_outputs=constraint, **req.sampling)
    inputs = await serving.process_inputs([{"prompt_token_ids": ids}], params, "messages")
    streams = await serving.add_all(request_id, inputs, stream, lora_request=serving.lora_request_for(model))
    parser = ChatOutputParsing(options, tool_req, serving.tokenizer).choice_parser() or ChoiceParser(None, None)
    return ChatGeneration(streams, parser, len(ids))
