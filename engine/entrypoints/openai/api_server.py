"""Running the server process: listening, a cap on concurrent connections, idle and header-read
timeouts, and a shutdown bounded by --shutdown-timeout.

Shutdown (SIGTERM or SIGINT): the listening socket closes, new requests on open connections get
503, requests in flight get up to ``shutdown_timeout`` seconds to finish; then the engine fails
the rest (streams end with an error event and ``[DONE]``), the executor (Ray workers included) is
shut down and the process exits, all within about ``shutdown_timeout + 1`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.config import EngineArgs
from engine.core.async_engine import AsyncLLMEngine
from engine.entrypoints.chat_utils import render_chat
from engine.entrypoints.openai.error_body import RateLimitError, error_bytes
from engine.entrypoints.openai.http_framing import json_errors
from engine.entrypoints.openai.limits import Rejections, RequestLimits
from engine.entrypoints.openai.serving_engine import ServerConfig
from engine.entrypoints.openai.tools import ToolOptions
from engine.entrypoints.openai.server import app_state, build_app
from engine.entrypoints.openai.tokenizer_pool import shared_pool
from engine.models.default_model import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

# after the drain deadline: how long handlers get to write their final error events
FINAL_EVENTS_S = 0.5


def default_max_connections() -> int:
    """2048, or fewer where the process may not open that many files."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 2048
    if soft == resource.RLIM_INFINITY:
        return 2048
    return max(16, min(2048, soft - 128))


class _Rejecting(asyncio.Protocol):
    """A connection over the cap: answered 503 with Retry-After, then closed."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        self.transport.write(head + self.body)
        # closing at once, with the request unread, can make the client see a reset instead
        asyncio.get_running_loop().call_later(1.0, self._close)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Counted(asyncio.Protocol):
    """Forwards to aiohttp's protocol and keeps the count of open connections exact."""

    def __init__(self, inner: asyncio.Protocol, limiter: "ConnectionLimiter") -> None:
        self.inner = inner
        self.limiter = limiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.limiter.open -= 1
        self.inner.connection_lost(exc)


@dataclass
class ConnectionLimiter:
    """The protocol factory for the listening socket: at most ``limit`` connections at a time."""

    server: Any  # aiohttp's web.Server: called, it makes a connection's protocol
    limit: int
    rejections: Rejections
    open: int = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.rejections.add("too_many_connections")
            err = RateLimitError(f"The server has {self.open} connections open, its limit "
                                 f"(--max-concurrent-connections); retry shortly",
                                 status=503, code="too_many_connections")
            return _Rejecting(error_bytes(err)[1])
        self.open += 1
        return _Counted(json_errors(self.server()), self)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_connections: int = 2048
    keepalive_timeout: float = 5.0  # also bounds how long a request head may take to arrive
    shutdown_timeout: float = 10.0
    access_log: logging.Logger | None = None


async def serve(app: web.Application, opts: ServeOptions, stop: asyncio.Event | None = None) -> None:
    """Serves ``app`` until ``stop`` is set (or SIGTERM / SIGINT), then shuts down as the module says."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    # aiohttp closes a connection whose request head is incomplete when keepalive_timeout passes,
    # counted from its arrival or its last response: the idle and header-read timeout in one
    runner = web.AppRunner(app, handler_cancellation=True, access_log=opts.access_log,
                           keepalive_timeout=opts.keepalive_timeout, shutdown_timeout=FINAL_EVENTS_S)
    await runner.setup()
    state = app_state(app)
    limiter = ConnectionLimiter(runner.server, opts.max_connections, state.rejections)
    listener = await loop.create_server(limiter, opts.host, opts.port, reuse_address=True)
    logger.info("listening on http://%s:%d", opts.host, opts.port)
    try:
        await stop.wait()
    finally:
        await _shut_down(runner, listener, state, opts.shutdown_timeout)


async def _shut_down(runner: web.AppRunner, listener: asyncio.AbstractServer, state: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    listener.close()
    state.draining = True
    deadline = t0 + timeout
    while state.active > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.active:
        logger.warning("shutdown: %d request(s) still running after %.1f s; ending them with an error",
                       state.active, timeout)
    # fails what is left (EngineDeadError: streams write an error event and [DONE]); a step still
    # running gets at most FINAL_EVENTS_S before the executor is shut down under it
    await state.engine.shutdown(timeout=FINAL_EVENTS_S)
    final = loop.time() + FINAL_EVENTS_S
    while state.active > 0 and loop.time() < final:
        await asyncio.sleep(0.02)
    await runner.cleanup()
    shared_pool().shutdown()
    logger.info("shutdown took %.1f s", loop.time() - t0)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    from pathlib import Path

    p = Path(value)
    return p.read_text() if p.is_file() else value


def served_root(engine_args: EngineArgs, names: list[str]) -> str:
    """What /v1/models reports as ``root``: the --model value when clients already see it as a
    served name, else the first served name (never a resolved checkpoint path)."""
    given = engine_args.model
    return given if given is not None and given in names else names[0]


def limits_from(ns: argparse.Namespace, vocab_size: int, max_model_len: int) -> RequestLimits:
    return RequestLimits(
        max_prompts_per_request=ns.max_prompts_per_request,
        max_stop_strings=ns.max_stop_strings,
        max_stop_string_length=ns.max_stop_string_length,
        max_token_ids=ns.max_token_ids or max(vocab_size, max_model_len),
        max_logit_bias=ns.max_logit_bias,
        max_request_items=ns.max_request_items,
    )


def _warm_up(state: Any, config: ServerConfig) -> None:
    """First-use costs paid before serving, not by the first requests (and the streams running
    beside them): the tokenizer copy of every pool thread, the chat template's compilation."""
    shared_pool().warm_up(state.tokenizer)
    try:
        render_chat(state.tokenizer, [{"role": "user", "content": "hi"}], config.chat_template, True,
                    **config.chat_options)
    except Exception:  # noqa: BLE001 - a template that needs more than this fails on requests, with a 400
        logger.debug("chat template warm-up failed", exc_info=True)


def tool_options_from(ns: argparse.Namespace) -> ToolOptions:
    try:
        return ToolOptions(ns.enable_auto_tool_choice, ns.tool_call_parser, ns.reasoning_parser,
                           max_stored_responses=ns.max_stored_responses)
    except ValueError as e:  # a flag mistake: say so before the model loads
        raise SystemExit(f"error: {e}") from None


def _lora_modules(ns: argparse.Namespace, engine_args: EngineArgs, engine: AsyncLLMEngine, base_name: str) -> Any:
    """The served adapters (--lora-modules, checked now: a bad one stops start-up), or None without --enable-lora."""
    from engine.entrypoints.openai.serving_lora import LoRAModules, parse_lora_module

    given = ns.lora_modules or []
    if not engine_args.enable_lora:
        if given:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    mods = LoRAModules.for_engine(engine, base_name, ns.allow_runtime_lora_updating)
    for text in given:
        mods.add(parse_lora_module(text))
    return mods


def make_engine_client(engine_args: EngineArgs, **kwargs: Any) -> Any:
    """The EngineClient the server talks to: one AsyncLLMEngine, or with data_parallel_size > 1 the
    front end of that many replicas on Ray (engine/dp/client.py)."""
    if engine_args.data_parallel_size > 1:
        from engine.dp.client import DPAsyncEngine

        return DPAsyncEngine.from_engine_args(engine_args, **kwargs)
    return AsyncLLMEngine.from_engine_args(engine_args, **kwargs)


def build_server(ns: argparse.Namespace, engine_args: EngineArgs) -> tuple[web.Application, ServeOptions, list[str]]:
    """Loads the engine and builds the app with every server flag applied: (app, listening
    options, served model names). ``run_server`` serves it; the Ray Serve deployment
    (engine/serve/deployment.py) serves the same app behind Serve's proxy."""
    tool_options = tool_options_from(ns)
    engine = make_engine_client(engine_args, log_stats=not ns.disable_log_stats,
                                log_stats_interval=ns.log_stats_interval,
                                max_num_queued_requests=ns.max_num_queued_requests)
    names = ns.served_model_name or [engine_args.model or DEFAULT_MODEL_NAME]
    config = ServerConfig(
        served_model_names=names,
        max_logprobs=ns.max_logprobs,
        response_role=ns.response_role,
        chat_template=_chat_template(ns.chat_template),
        chat_options={"content_format": ns.chat_template_content_format,
                      "split_special_tokens": ns.chat_split_special_tokens},
        tool_options=tool_options,
    )
    config.lora_modules = _lora_modules(ns, engine_args, engine, names[0])
    info = engine.model_config
    app = build_app(
        engine, config, engine.get_tokenizer(), api_key=ns.api_key, max_body=ns.max_request_body_bytes,
        model_root=served_root(engine_args, names), limits=limits_from(ns, info.vocab_size, info.max_model_len),
        api_key_all_routes=ns.api_key_all_routes, body_read_timeout=ns.request_read_timeout,
        shutdown_timeout=ns.shutdown_timeout, frontend=not ns.disable_frontend,
    )
    _warm_up(app_state(app), config)
    opts = ServeOptions(
        host=ns.host, port=ns.port, max_connections=ns.max_concurrent_connections or default_max_connections(),
        keepalive_timeout=ns.timeout_keep_alive, shutdown_timeout=ns.shutdown_timeout,
        access_log=None if ns.disable_log_requests else logging.getLogger("aiohttp.access"),
    )
    return app, opts, names


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    """Loads the engine, then serves until SIGTERM / SIGINT (``python -m engine serve``)."""
    app, opts, names = build_server(ns, engine_args)
    logger.info("serving %s on http://%s:%d", names[0], ns.host, ns.port)
    asyncio.run(serve(app, opts))
    # everything that needs stopping (engine, executor, Ray) is stopped: exit now. Interpreter
    # teardown takes about 2 s here (freeing the model, joining idle pool threads, a tokenizer
    # thread busy with a huge input) and would push the exit past shutdown_timeout + 2 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
