"""POST /v1/embeddings: OpenAI's schema, served by pooling requests in the same engine as
generation (engine/pooling/)."""
from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from engine.core.input_processor import ProcessedInput
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int, random_id
from engine.entrypoints.openai.serving_engine import (
    OpenAIServing, engine_dead_error, error_response, input_error, json_response,
)
from engine.errors import EngineDeadError, PromptTooLongError
from engine.outputs import EmbeddingRequestOutput
from engine.pooling.params import PoolingParams

ENCODING_FORMATS = ("float", "base64")
_INPUT_SHAPES = "a string, an array of strings, an array of token ids or an array of arrays of token ids"


def encode_embedding(embedding: list[float], encoding_format: str) -> list[float] | str:
    """``base64``: the little-endian float32 bytes, base64-encoded (what OpenAI's client decodes
    with ``np.frombuffer(..., dtype="float32")``)."""
    if encoding_format == "float":
        return embedding
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode("ascii")


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_input(raw: Any) -> list[str | list[int]]:
    """The inputs as strings and token-id lists; anything else (or an empty one) is a 400 on ``input``."""
    if isinstance(raw, str) or _is_ids(raw):
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    elif isinstance(raw, list):
        raise OpenAIError("'input' must not be an empty array: give at least one input", param="input")
    else:
        raise OpenAIError(f"'input' must be {_INPUT_SHAPES}", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise OpenAIError(f"'input[{i}]' must not be an empty string", param="input")
        elif not _is_ids(item):
            raise OpenAIError(f"'input' must be {_INPUT_SHAPES}; input[{i}] is neither", param="input")
    return items


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: web.Request, data: Any) -> web.StreamResponse:
        body = Body(data)
        model = self.check_model(body)
        if self.lora_request_for(model) is not None:
            raise OpenAIError(f"`{model}` is a LoRA adapter; embeddings are served by the base model only",
                              param="model")
        items = parse_input(body.required("input"))
        encoding_format = body.str("encoding_format", "float")
        if encoding_format not in ENCODING_FORMATS:
            raise OpenAIError(f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}",
                              param="encoding_format")
        params = PoolingParams(dimensions=body.int("dimensions", None, lo=1))
        body.str("user")  # accepted, unused
        priority = body.int("priority", 0)
        inputs = await self._process(items, params)
        request_id = random_id("embd")
        streams = await self.add_all(request_id, inputs, stream=False, priority=priority)
        try:
            try:
                outs = await self.final_outputs(streams)
            except EngineDeadError as e:
                return error_response(engine_dead_error(e, status=500))
            return json_response(self._response(request_id, model, outs, encoding_format))
        finally:
            self.abort_unfinished(streams)

    async def _process(self, items: list[str | list[int]], params: PoolingParams) -> list[ProcessedInput]:
        def process() -> list[ProcessedInput]:
            out = []
            for item in items:
                prompt = {"prompt_token_ids": item} if isinstance(item, list) else item
                out.append(self.input_processor.process(prompt, params))
            return out

        try:
            return await self.in_tokenizer_thread(process, size=sum(len(i) for i in items))
        except PromptTooLongError as e:  # longer than max_model_len (or than the whole KV cache)
            raise OpenAIError(str(e), param="input", code="context_length_exceeded") from None
        except ValueError as e:
            raise input_error(e, "input") from None

    @staticmethod
    def _response(request_id: str, model: str, outs: list[EmbeddingRequestOutput], encoding_format: str) -> dict:
        for out in outs:
            if out.finish_reason != "stop":
                raise OpenAIError(f"the embedding request ended with {out.finish_reason!r}", status=500,
                                  type="server_error")
        num_tokens = sum(len(o.prompt_token_ids) for o in outs)
        return {
            "id": request_id,
            "object": "list",
            "created": now_int(),
            "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(o.outputs.embedding,
                                                                                         encoding_format)}
                     for i, o in enumerate(outs)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }
