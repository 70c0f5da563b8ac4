"""The OpenAI-compatible HTTP server (aiohttp): routes, JSON body reading, auth, admission and error
mapping. Process lifecycle (listening, connection cap, shutdown) is in api_server.py."""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine import __version__ as ENGINE_VERSION
from engine.config import EngineArgs
from engine.core.engine_client import EngineClient, QueueFullError
from engine.entrypoints.anthropic.errors import anthropic_error_response
from engine.entrypoints.anthropic.serving import AnthropicServingMessages
from engine.entrypoints.chat_utils import render_chat
from engine.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from engine.entrypoints.openai.error_body import RateLimitError
from engine.entrypoints.openai.frontend import FRONTEND_ROUTES, add_frontend_routes
from engine.entrypoints.openai.limits import LimitError, Rejections, RequestLimits
from engine.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, render_metrics
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int
from engine.entrypoints.openai.request_body import parse_json_body
from engine.entrypoints.openai.serving_chat import OpenAIServingChat, parse_messages
from engine.entrypoints.openai.serving_completion import OpenAIServingCompletion
from engine.entrypoints.openai.serving_responses import OpenAIServingResponses
from engine.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from engine.entrypoints.openai.serving_engine import ServerConfig, error_response, json_response
from engine.entrypoints.openai.tokenizer_pool import PerThreadTokenizer

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENGINE_KEY = web.AppKey("engine", EngineClient)
STATE_KEY = web.AppKey("state", object)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; wrong content types, oversize, slow and malformed bodies are
    OpenAIErrors (see request_body.parse_json_body for what is refused)."""
    if request.content_type != "application/json":
        raise OpenAIError(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r}", status=415
        )
    st = _state(request)
    limit = st.max_body
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    try:
        raw = await asyncio.wait_for(request.read(), st.body_read_timeout)
    except asyncio.TimeoutError:
        raise OpenAIError(f"The request body did not arrive within {st.body_read_timeout:g} s", status=408,
                          code="request_timeout") from None
    return parse_json_body(raw)


def _too_large(size: int | None, limit: int) -> OpenAIError:
    got = f" ({size} bytes)" if size is not None else ""
    return OpenAIError(f"The request body{got} exceeds the limit of {limit} bytes", status=413,
                       code="request_too_large")


# routes that answer without the API key unless --api-key-all-routes (probes and scrapers)
PUBLIC_ROUTES = frozenset({"/health", "/metrics", "/version"})


@dataclass
class _State:
    engine: EngineClient
    config: ServerConfig
    tokenizer: Any
    api_key: bytes | None
    max_body: int
    model_root: str
    limits: RequestLimits = field(default_factory=RequestLimits)
    api_key_all_routes: bool = False
    body_read_timeout: float = 30.0
    rejections: Rejections = field(default_factory=Rejections)
    public_routes: frozenset[str] = PUBLIC_ROUTES  # answered without the API key (unless all routes)
    draining: bool = False  # shutting down: new requests get 503
    active: int = 0  # requests being handled now
    completion: OpenAIServingCompletion = field(init=False)
    chat: OpenAIServingChat = field(init=False)
    embedding: OpenAIServingEmbedding = field(init=False)
    messages: AnthropicServingMessages = field(init=False)  # POST /v1/messages
    responses: OpenAIServingResponses = field(init=False)  # POST /v1/responses
    created: int = field(default_factory=now_int)

    def __post_init__(self) -> None:
        self.completion = OpenAIServingCompletion(self.engine, self.config, self.tokenizer)
        self.chat = OpenAIServingChat(self.engine, self.config, self.tokenizer)
        self.embedding = OpenAIServingEmbedding(self.engine, self.config, self.tokenizer)
        self.messages = AnthropicServingMessages(self.engine, self.config, self.tokenizer)
        self.responses = OpenAIServingResponses(self.engine, self.config, self.tokenizer,
                                                store_capacity=self.config.tool_options.max_stored_responses)


def _state(request: web.Request) -> _State:
    return request.app[STATE_KEY]  # type: ignore[return-value]


# ---- middlewares -------------------------------------------------------------------------------
@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error JSON, never as a framework page."""
    st = _state(request)
    try:
        return await handler(request)
    except OpenAIError as e:
        if isinstance(e, LimitError):
            st.rejections.add("request_limit")
        return error_response(e)
    except QueueFullError as e:
        st.rejections.add("queue_full")
        return error_response(RateLimitError(str(e), code="queue_full"))
    except web.HTTPRequestEntityTooLarge:
        return error_response(_too_large(request.content_length, st.max_body))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status)
        msg = {404: f"Not found: {request.method} {request.path}",
               405: f"Method {request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        return error_response(OpenAIError(msg, status=e.status, code=code))
    except (ConnectionResetError, ConnectionAbortedError, asyncio.CancelledError):
        raise
    except RecursionError:
        return error_response(OpenAIError("The request is nested too deeply"))
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(OpenAIError("Internal server error", status=500, type="server_error"))


@web.middleware
async def admission_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests in flight (shutdown waits for them) and refuses new ones while draining."""
    st = _state(request)
    if st.draining and request.path not in PUBLIC_ROUTES:
        st.rejections.add("shutting_down")
        return error_response(OpenAIError("The server is shutting down", status=503, type="server_error",
                                          code="shutting_down"))
    st.active += 1
    try:
        return await handler(request)
    finally:
        st.active -= 1


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = _state(request)
    key = st.api_key
    if key is not None and (st.api_key_all_routes or request.path not in st.public_routes):
        try:  # header text holds undecodable bytes as surrogate escapes: compare the raw bytes
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            # Anthropic's clients send the key as x-api-key
            given_x = request.headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            given = given_x = b""
        if not (hmac.compare_digest(given, b"Bearer " + key) or hmac.compare_digest(given_x, key)):
            err = OpenAIError("Incorrect API key provided.", status=401, code="invalid_api_key")
            return anthropic_error_response(err) if request.path in ANTHROPIC_ROUTES else error_response(err)
    return await handler(request)


# ---- handlers ----------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    try:
        report = await _state(request).engine.check_health()
    except Exception as e:  # noqa: BLE001
        return error_response(OpenAIError(str(e), status=503, type="server_error", code="engine_dead"))
    # a data-parallel engine reports its replicas ({"status": "ok" | "degraded", ...}): still 200
    return json_response(report) if report is not None else web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    st = _state(request)
    text = render_metrics(st.engine, st.config.served_model_names[0], rejections=st.rejections.snapshot())
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": ENGINE_VERSION})


async def models(request: web.Request) -> web.Response:
    st = _state(request)
    data = [
        {"id": name, "object": "model", "created": st.created, "owned_by": "paged-engine",
         "root": st.model_root, "parent": None, "max_model_len": st.completion.max_model_len}
        for name in st.config.served_model_names
    ]
    if st.config.lora_modules is not None:  # adapters: parent = the base model
        data += st.config.lora_modules.model_cards(st.created, st.completion.max_model_len)
    return json_response({"object": "list", "data": data})


async def completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    data = await read_json(request)
    st.limits.check_body(data, prompts_field="prompt")
    return await st.completion.create_completion(request, data)


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    st = _state(request)  # errors in Anthropic's shape, the body read included
    return await st.messages.handle(request, read_json, st.limits.check_body)


ANTHROPIC_ROUTES = frozenset({"/v1/messages"})


async def responses(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    data = await read_json(request)
    st.limits.check_body(data)
    return await st.responses.create_response(request, data)


async def get_response(request: web.Request) -> web.Response:
    return _state(request).responses.retrieve(request.match_info["response_id"])


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    data = await read_json(request)
    st.limits.check_body(data)
    return await st.chat.create_chat_completion(request, data)


async def embeddings(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    data = await read_json(request)
    st.limits.check_body(data, prompts_field="input")
    return await st.embedding.create_embedding(request, data)


async def tokenize(request: web.Request) -> web.Response:
    st = _state(request)
    body = Body(await read_json(request))
    st.completion.check_model(body)
    want_strs = body.bool("return_token_strs", False)
    if body.has("messages"):
        messages = parse_messages(body)
        add_generation_prompt = body.bool("add_generation_prompt", True)
        try:
            ids = await st.completion.in_tokenizer_thread(
                lambda: render_chat(st.tokenizer, messages, st.config.chat_template, add_generation_prompt,
                                    **st.config.chat_options),
                size=sum(len(m["content"]) for m in messages),
            )
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
    else:
        prompt = body.required("prompt")
        if not isinstance(prompt, str):
            raise OpenAIError("'prompt' must be a string", param="prompt")
        add_special = body.bool("add_special_tokens", True)
        ids = await st.completion.in_tokenizer_thread(
            lambda: st.tokenizer.encode(prompt, add_special_tokens=add_special), size=len(prompt)
        )
    strs = None
    if want_strs:
        strs = await st.completion.in_tokenizer_thread(st.tokenizer.convert_ids_to_tokens, ids, size=len(ids))
    head = {"count": len(ids), "max_model_len": st.completion.max_model_len}
    # a long answer is serialised off the event loop, in slices, so no stream waits for it
    body = await st.completion.in_tokenizer_thread(_tokenize_body, head, ids, strs, size=len(ids))
    return web.Response(body=body, content_type="application/json")


def _tokenize_body(head: dict, ids: list[int], strs: list[str] | None) -> bytes:
    parts = [json.dumps(head, ensure_ascii=False)[:-1], ', "tokens": [']
    step = 8192  # each slice holds the GIL for about a millisecond
    parts += [",".join(map(str, ids[i:i + step])) + ("," if i + step < len(ids) else "")
              for i in range(0, len(ids), step)]
    parts.append('], "token_strs": ')
    if strs is None:
        parts.append("null")
    else:
        parts.append("[")
        parts += [json.dumps(strs[i:i + step], ensure_ascii=False)[1:-1] + ("," if i + step < len(strs) else "")
                  for i in range(0, len(strs), step)]
        parts.append("]")
    parts.append("}")
    return "".join(parts).encode()


async def detokenize(request: web.Request) -> web.Response:
    st = _state(request)
    data = await read_json(request)
    body = Body(data)
    st.completion.check_model(body)
    if isinstance(data.get("tokens"), list):
        st.limits.check_token_ids("tokens", len(data["tokens"]))
    ids = body.int_list("tokens")
    if ids is None:
        raise OpenAIError("'tokens' is a required property", param="tokens")
    st.completion.check_ids(ids, "tokens")
    text = await st.completion.in_tokenizer_thread(st.tokenizer.decode, ids, size=len(ids))
    return json_response({"prompt": text})


# ---- app ---------------------------------------------------------------------------------------
def build_app(
    engine: EngineClient,
    config: ServerConfig,
    tokenizer: Any,
    *,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
    model_root: str = "",
    limits: RequestLimits | None = None,
    api_key_all_routes: bool = False,
    body_read_timeout: float = 30.0,
    shutdown_timeout: float = 10.0,
    frontend: bool = True,
) -> web.Application:
    """The routes. ``model_root`` is what /v1/models reports as ``root`` (never a path the user
    did not give). ``tokenizer`` is used from several threads: a PerThreadTokenizer unless it is."""
    if not isinstance(tokenizer, PerThreadTokenizer):
        tokenizer = PerThreadTokenizer(tokenizer)
    # aiohttp refuses bodies over client_max_size itself; read_json turns that into a JSON 413
    app = web.Application(middlewares=[errors_middleware, admission_middleware, auth_middleware],
                          client_max_size=max_body)
    app[STATE_KEY] = _State(engine, config, tokenizer, api_key.encode() if api_key else None, max_body,
                            model_root, limits or RequestLimits(), api_key_all_routes, body_read_timeout)
    app[ENGINE_KEY] = engine
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    if config.lora_modules is not None:
        from engine.entrypoints.openai.serving_lora import add_lora_routes

        add_lora_routes(app, config.lora_modules, read_json)
    if frontend:
        add_frontend_routes(app)
        app[STATE_KEY].public_routes = PUBLIC_ROUTES | FRONTEND_ROUTES

    async def start_engine(app: web.Application) -> None:
        engine.start()

    async def stop_engine(app: web.Application) -> None:
        await engine.shutdown(timeout=shutdown_timeout)

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


def app_state(app: web.Application) -> _State:
    return app[STATE_KEY]  # type: ignore[return-value]


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    """Loads the engine, then serves until SIGTERM / SIGINT (``python -m engine serve``)."""
    from engine.entrypoints.openai.api_server import run_server as run

    return run(ns, engine_args)
