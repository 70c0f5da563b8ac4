"""The OpenAI-compatible HTTP server (aiohttp): routes, JSON body reading, auth and error mapping."""
from __future__ import annotations

import argparse
import copy
import hmac
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine import __version__ as ENGINE_VERSION
from engine.config import EngineArgs
from engine.core.async_engine import AsyncLLMEngine
from engine.core.engine_client import EngineClient
from engine.entrypoints.chat_utils import render_chat
from engine.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from engine.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, render_metrics
from engine.entrypoints.openai.protocol import Body, OpenAIError, now_int
from engine.entrypoints.openai.serving_chat import OpenAIServingChat, parse_messages
from engine.entrypoints.openai.serving_completion import OpenAIServingCompletion
from engine.entrypoints.openai.serving_engine import ServerConfig, error_response, json_response
from engine.models.default_model import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENGINE_KEY = web.AppKey("engine", EngineClient)
STATE_KEY = web.AppKey("state", object)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; wrong content types, oversize and malformed bodies are OpenAIErrors."""
    if request.content_type != "application/json":
        raise OpenAIError(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r}", status=415
        )
    limit = request.app[STATE_KEY].max_body
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenAIError(f"We could not parse the JSON body of your request: {e}") from None


def _too_large(size: int | None, limit: int) -> OpenAIError:
    got = f" ({size} bytes)" if size is not None else ""
    return OpenAIError(f"The request body{got} exceeds the limit of {limit} bytes", status=413,
                       code="request_too_large")


class _State:
    def __init__(self, engine: EngineClient, config: ServerConfig, tokenizer: Any, api_key: str | None,
                 max_body: int, model_root: str) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = tokenizer
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.model_root = model_root
        self.completion = OpenAIServingCompletion(engine, config, tokenizer)
        self.chat = OpenAIServingChat(engine, config, tokenizer)
        self.created = now_int()


def _state(request: web.Request) -> _State:
    return request.app[STATE_KEY]  # type: ignore[return-value]


# ---- middlewares -------------------------------------------------------------------------------
@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error JSON, never as a framework page."""
    try:
        return await handler(request)
    except OpenAIError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return error_response(_too_large(request.content_length, _state(request).max_body))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status)
        msg = {404: f"Not found: {request.method} {request.path}",
               405: f"Method {request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        return error_response(OpenAIError(msg, status=e.status, code=code))
    except (ConnectionResetError, ConnectionAbortedError):
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(OpenAIError("Internal server error", status=500, type="server_error"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = _state(request).api_key
    if key is not None and request.path.startswith("/v1"):
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, b"Bearer " + key):
            return error_response(
                OpenAIError("Incorrect API key provided.", status=401, code="invalid_api_key")
            )
    return await handler(request)


# ---- handlers ----------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    try:
        await _state(request).engine.check_health()
    except Exception as e:  # noqa: BLE001
        return error_response(OpenAIError(str(e), status=503, type="server_error", code="engine_dead"))
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    st = _state(request)
    text = render_metrics(st.engine, st.config.served_model_names[0])
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
    return json_response({"object": "list", "data": data})


async def completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    return await st.completion.create_completion(request, await read_json(request))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    return await st.chat.create_chat_completion(request, await read_json(request))


async def tokenize(request: web.Request) -> web.Response:
    st = _state(request)
    body = Body(await read_json(request))
    st.completion.check_model(body)
    if body.has("messages"):
        try:
            ids = await st.completion.in_tokenizer_thread(
                render_chat, st.tokenizer, parse_messages(body), st.config.chat_template,
                body.bool("add_generation_prompt", True),
            )
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
    else:
        prompt = body.required("prompt")
        if not isinstance(prompt, str):
            raise OpenAIError("'prompt' must be a string", param="prompt")
        add_special = body.bool("add_special_tokens", True)
        ids = await st.completion.in_tokenizer_thread(
            lambda: st.tokenizer.encode(prompt, add_special_tokens=add_special)
        )
    strs = st.tokenizer.convert_ids_to_tokens(ids) if body.bool("return_token_strs", False) else None
    return json_response({"count": len(ids), "max_model_len": st.completion.max_model_len, "tokens": ids,
                          "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    st = _state(request)
    body = Body(await read_json(request))
    st.completion.check_model(body)
    ids = body.int_list("tokens")
    if ids is None:
        raise OpenAIError("'tokens' is a required property", param="tokens")
    st.completion.check_ids(ids, "tokens")
    return json_response({"prompt": st.tokenizer.decode(ids)})


# ---- app ---------------------------------------------------------------------------------------
def build_app(
    engine: EngineClient,
    config: ServerConfig,
    tokenizer: Any,
    *,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
    model_root: str = "",
) -> web.Application:
    # aiohttp refuses bodies over client_max_size itself; read_json turns that into a JSON 413
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=max_body)
    app[STATE_KEY] = _State(engine, config, tokenizer, api_key, max_body, model_root)
    app[ENGINE_KEY] = engine
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)

    async def start_engine(app: web.Application) -> None:
        engine.start()

    async def stop_engine(app: web.Application) -> None:
        await engine.shutdown()

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    return p.read_text() if p.is_file() else value


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    """Loads the engine, then serves until interrupted (``python -m engine serve``)."""
    engine = AsyncLLMEngine.from_engine_args(
        engine_args, log_stats=not ns.disable_log_stats, log_stats_interval=ns.log_stats_interval
    )
    names = ns.served_model_name or [engine_args.model or DEFAULT_MODEL_NAME]
    config = ServerConfig(
        served_model_names=names,
        max_logprobs=ns.max_logprobs,
        response_role=ns.response_role,
        chat_template=_chat_template(ns.chat_template),
    )
    # the server's own tokenizer: the engine's is busy on the engine thread (not started yet, so
    # copying it is safe)
    tokenizer = copy.deepcopy(engine.get_tokenizer())
    app = build_app(
        engine, config, tokenizer, api_key=ns.api_key,
        max_body=ns.max_request_body_bytes, model_root=engine.model_config.model_path,
    )
    logger.info("serving %s on http://%s:%d", names[0], ns.host, ns.port)
    web.run_app(
        app, host=ns.host, port=ns.port, handler_cancellation=True, print=None,
        access_log=None if ns.disable_log_requests else logging.getLogger("aiohttp.access"),
    )
    return 0
