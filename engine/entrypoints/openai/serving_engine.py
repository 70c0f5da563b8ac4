"""What the completion and chat endpoints share: model names, sampling fields, context-length
checks, streaming over several engine requests, and SSE / error plumbing."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from aiohttp import web

from engine.core.engine_client import EngineClient, OutputStream
from engine.core.input_processor import InvalidInputError, ProcessedInput, PromptType
from engine.errors import EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.entrypoints.openai.protocol import Body, OpenAIError
from engine.entrypoints.openai.tools import ToolOptions
from engine.structured_output.openai_fields import structured_outputs_from_body, wait_for_grammars
from engine.entrypoints.openai.error_body import safe_error_response
from engine.entrypoints.openai.tokenizer_pool import TokenizerPool, shared_pool

logger = logging.getLogger(__name__)

# OpenAI's limits
MAX_N = 128
_INT64 = (-(2**63), 2**63 - 1)
# JSON has no -inf: vLLM reports impossible tokens with this logprob
MIN_LOGPROB = -9999.0


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False), status=status, content_type="application/json")


def error_response(err: OpenAIError) -> web.Response:
    return safe_error_response(err)  # ASCII-escaped, cannot fail (messages may quote user input)


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


async def write_quietly(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionResetError:
        pass


def engine_dead_error(e: BaseException, status: int = 503) -> OpenAIError:
    return OpenAIError(str(e) or "the engine is not running", status=status, type="server_error", code="engine_dead")


def clamp_logprob(lp: float) -> float:
    return max(lp, MIN_LOGPROB)


def input_error(e: ValueError, prompt_param: str) -> OpenAIError:
    """The engine's verdict on a request input as a 400 naming the request field at fault: the
    InputProcessor's field, except that the prompt is called what this endpoint calls it."""
    param = getattr(e, "param", None)
    if param in (None, "prompt", "prompt_token_ids"):
        param = prompt_param
    return OpenAIError(str(e), param=param)


def _tokenize_pool() -> TokenizerPool:
    # one pool for all servings; the server's tokenizer is a PerThreadTokenizer (a copy per thread)
    return shared_pool()


def _byte_level_table() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character table, inverted (byte-level BPE vocabularies
    spell every token with these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """The raw bytes of a token, as OpenAI's chat logprobs report them: for byte-level BPE a token may
    hold part of a UTF-8 character, whose decoded text is only U+FFFD."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.table = _byte_level_table() if type(decoder).__name__ == "ByteLevel" else None
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        out = list(text.encode("utf-8"))
        if self.table is not None and token_id not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self.table for c in piece):
                out = [self.table[c] for c in piece]
        if len(self._cache) < 65536:
            self._cache[token_id] = out
        return out


@dataclass
class ServerConfig:
    served_model_names: list[str]
    max_logprobs: int = 20
    response_role: str = "assistant"
    chat_template: str | None = None
    # render_chat options: content_format ("auto" / "string" / "openai"), split_special_tokens
    chat_options: dict[str, Any] = field(default_factory=dict)
    # LoRA: the adapters served by name (engine/entrypoints/openai/serving_lora.py), None without --enable-lora
    lora_modules: Any = None
    # tool calling and reasoning: --enable-auto-tool-choice, --tool-call-parser, --reasoning-parser
    tool_options: ToolOptions = field(default_factory=ToolOptions)


class OpenAIServing:
    # OpenAI's range is [0, 2]; completions keep vLLM's wider one (finite: fp32 logits / t stay finite)
    max_temperature: float = 100.0

    def __init__(self, engine: EngineClient, config: ServerConfig, tokenizer: Any) -> None:
        self.engine = engine
        self.config = config
        # a tokenizer of our own: the engine thread uses the engine's, and HF fast tokenizers
        # must not be shared across threads
        self.tokenizer = tokenizer
        self._tokenize_pool = _tokenize_pool()
        self.token_bytes = TokenBytes(tokenizer)
        self.max_model_len = engine.model_config.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        # the engine's request checks, run here (in the tokenizer thread, with our tokenizer) so the
        # engine queues what we hand it without checking again
        self.input_processor = engine.input_processor.with_tokenizer(tokenizer)

    async def in_tokenizer_thread(self, fn: Any, *args: Any, size: int = 0) -> Any:
        """Runs a tokenizer call (encode, chat template) off the event loop: a long prompt takes
        milliseconds to tokenize and would stall every stream meanwhile. ``size`` (characters or
        ids) picks the lane: long inputs queue behind each other, not in front of short ones."""
        return await self._tokenize_pool.run(fn, *args, size=size)

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    def check_model(self, body: Body) -> str:
        model = body.str("model")
        if model is None:
            return self.model_name
        if model not in self.config.served_model_names and self.lora_request_for(model) is None:
            raise OpenAIError(
                f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found"
            )
        return model

    def lora_request_for(self, model: str) -> Any:
        """The LoRARequest a ``model`` name picks (None: the base model)."""
        mods = self.config.lora_modules
        return mods.resolve(model) if mods is not None else None

    def check_ids(self, ids: list[int], param: str) -> None:
        try:
            self.input_processor.check_ids(ids, param)
        except InvalidInputError as e:
            raise input_error(e, param) from None

    async def process_inputs(
        self, prompts: list[PromptType], params: SamplingParams, prompt_param: str
    ) -> list[ProcessedInput]:
        """Every prompt's request checked and filled in by the engine's InputProcessor (token ids in
        the vocabulary, stop / allowed / logit_bias ids, logprob caps); bad input is a 400."""
        def process() -> list[ProcessedInput]:
            return [self.input_processor.process(p, params) for p in prompts]

        size = sum(len(p.get("prompt_token_ids") or ()) if isinstance(p, dict) else len(p) for p in prompts)
        try:
            inputs = await self.in_tokenizer_thread(process, size=size)
        except ValueError as e:
            raise input_error(e, prompt_param) from None
        await wait_for_grammars(self.input_processor, inputs)  # a constraint that cannot compile: 400 now
        return inputs

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """Returns max_tokens (defaulted to what fits); rejects what cannot fit the context."""
        if num_prompt_tokens == 0:
            raise OpenAIError(f"'{param}' must not be empty", param=param)
        if num_prompt_tokens >= self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
                f"{num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=param, code="context_length_exceeded",
            )
        if max_tokens is None:
            return self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the input, {max_tokens} in the "
                "completion). Please reduce the length of the input or completion.",
                param="max_tokens", code="context_length_exceeded",
            )
        return max_tokens

    def sampling_kwargs(self, body: Body) -> dict[str, Any]:
        """The sampling fields both endpoints share (OpenAI's plus vLLM's extras)."""
        kw = dict(
            n=body.int("n", 1, lo=1, hi=MAX_N),
            temperature=body.float("temperature", 1.0, lo=0.0, hi=self.max_temperature),
            top_p=body.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
            top_k=body.int("top_k", 0, lo=-1),
            min_p=body.float("min_p", 0.0, lo=0.0, hi=1.0),
            presence_penalty=body.float("presence_penalty", 0.0, lo=-2.0, hi=2.0),
            frequency_penalty=body.float("frequency_penalty", 0.0, lo=-2.0, hi=2.0),
            repetition_penalty=body.float("repetition_penalty", 1.0, lo=0.01, hi=100.0),
            seed=body.int("seed", None, lo=_INT64[0], hi=_INT64[1]),
            stop=body.stop("stop"),
            stop_token_ids=body.int_list("stop_token_ids") or [],
            ignore_eos=body.bool("ignore_eos", False),
            min_tokens=body.int("min_tokens", 0, lo=0),
            skip_special_tokens=body.bool("skip_special_tokens", True),
            spaces_between_special_tokens=body.bool("spaces_between_special_tokens", True),
            include_stop_str_in_output=body.bool("include_stop_str_in_output", False),
            logit_bias=body.logit_bias(),
            allowed_token_ids=body.int_list("allowed_token_ids"),
            structured_outputs=structured_outputs_from_body(body),  # response_format / structured_outputs
        )
        body.str("user")  # accepted, unused
        if kw["top_k"] == 0 and body.has("top_k"):
            raise OpenAIError("'top_k' must be -1 (disabled) or at least 1, got 0", param="top_k")
        if kw["top_k"] >= self.vocab_size:  # keeps every token: the same as no top-k
            kw["top_k"] = 0
        best_of = body.int("best_of", None, lo=1)
        if best_of is not None and best_of != kw["n"]:
            raise OpenAIError("'best_of' other than n is not supported", param="best_of")
        return kw

    @staticmethod
    def make_params(**kw: Any) -> SamplingParams:
        """SamplingParams, with its own validation errors turned into 400s naming the field."""
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in kw else None
            raise OpenAIError(msg, param=param) from None

    async def add_all(
        self, base_id: str, inputs: list[ProcessedInput], stream: bool, priority: int = 0, lora_request: Any = None,
    ) -> list[OutputStream]:
        """Submits one engine request per processed prompt (with ``lora_request``'s adapter); on any
        failure aborts the ones already added."""
        streams: list[OutputStream] = []
        if lora_request is not None:
            inputs = [replace(p, lora_request=lora_request) for p in inputs]
        try:
            for i, processed in enumerate(inputs):
                # the queue cap admits a request whole: only its first prompt is checked against it
                streams.append(await self.engine.add_request(
                    f"{base_id}-{i}", processed, stream=stream, priority=priority, check_queue=i == 0
                ))
        except BaseException as e:
            self.engine.abort([s.request_id for s in streams])
            if isinstance(e, EngineDeadError):
                raise engine_dead_error(e) from None
            if isinstance(e, InvalidInputError):
                raise OpenAIError(str(e), param=e.param) from None
            if isinstance(e, ValueError):
                raise OpenAIError(str(e)) from None
            raise
        return streams

    def abort_unfinished(self, streams: list[OutputStream]) -> None:
        ids = [s.request_id for s in streams if not s.finished]
        if ids:
            logger.info("aborting %d request(s) whose client went away: %s", len(ids), ids[:4])
            self.engine.abort(ids)

    @staticmethod
    async def final_outputs(streams: list[OutputStream]) -> list[RequestOutput]:
        """Waits for every request's final output (non-streaming requests deliver only that)."""
        return list(await asyncio.gather(*(s.get() for s in streams)))

    @staticmethod
    async def merged(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta output) from several requests, in arrival order."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, s: OutputStream) -> None:
            try:
                async for out in s:
                    queue.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - forwarded to the consumer
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def start_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"},
        )
        await resp.prepare(request)
        return resp
