"""The OpenAI-compatible server as a Ray Serve application (``pip install -e ".[serve]"``).

Each Serve replica loads one engine and builds the very app ``python -m engine serve`` serves
(engine/entrypoints/openai/api_server.py: build_server, every route and flag), listening on a free
loopback port inside the replica; the Serve ingress re-dispatches each HTTP request to it and
streams the answer back (Server-Sent Events included). No route is written twice, and a client
that goes away closes the inner request too, which aborts it in the engine.

Scaling is Serve's: ``num_replicas``, or ``autoscaling_config`` on queue length
(``target_ongoing_requests`` per replica, Serve's measure of requests queued and running), in the
deployment options or the config file (examples/serve_config.yaml, ``serve run``). Arguments are
the CLI's flags without dashes, e.g. ``{"model": "/path", "max-model-len": 2048, "served-model-name":
"smol"}``; a bad one fails the build with the CLI's own message.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

logger = logging.getLogger(__name__)

# headers that belong to one hop (RFC 9110 7.6.1), never forwarded in either direction
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"})


def server_namespace(args: dict[str, Any]) -> argparse.Namespace:
    """The ``python -m engine serve`` namespace for ``args`` (flag names without dashes; True for
    a switch). Unknown or malformed values raise ValueError with argparse's message."""
    from engine.entrypoints.cli import add_engine_args
    from engine.entrypoints.openai.cli_args import add_server_args

    parser = argparse.ArgumentParser(prog="engine.serve", exit_on_error=False)
    add_engine_args(parser)
    add_server_args(parser)
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    try:
        ns, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"engine.serve: {e}") from None
    if extra:
        raise ValueError(f"engine.serve: unknown argument(s) {extra}; use the flags of `python -m engine serve`")
    ns.host, ns.port = "127.0.0.1", 0  # the inner app: loopback, a port the kernel picks
    return ns


def bind_replica_grpc_to_node_address() -> bool:
    """Ray Serve (2.60) starts an inter-deployment gRPC server in every replica on ``[::]:0``, i.e.
    on every interface of the host, whatever the cluster's node address. In this replica's process
    that server is bound to the node's Ray address instead (127.0.0.1 on a loopback cluster), where
    the other Serve processes reach it. Returns whether the hook is in place (False: a Ray without
    that function, nothing changed)."""
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return False
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, "binds_node_address", False):
        return True

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            import ray

            ip = ray.util.get_node_ip_address()
            address = f"[{ip}]:{address[5:]}" if ":" in ip else f"{ip}:{address[5:]}"
        return original(server, address)

    add_port.binds_node_address = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = add_port
    return True


@serve.deployment(name="OpenAIServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
class OpenAIServer:
    def __init__(self, args: dict[str, Any]) -> None:
        from engine.entrypoints.cli import engine_args_from
        from engine.entrypoints.openai.api_server import build_server

        bind_replica_grpc_to_node_address()  # before Serve starts that server, after this constructor
        ns = server_namespace(args)
        self.app, self.opts, self.names = build_server(ns, engine_args_from(ns))
        self._base: str | None = None
        self._runner = None
        self._session = None
        self._lock = asyncio.Lock()

    async def _start(self) -> str:
        """The inner aiohttp server on 127.0.0.1 (started on first use, on the replica's loop)."""
        async with self._lock:
            if self._base is None:
                import aiohttp
                from aiohttp import web

                self._runner = web.AppRunner(self.app, access_log=None)
                await self._runner.setup()  # on_startup: the engine loop starts
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                await site.start()
                port = self._runner.addresses[0][1]
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                      auto_decompress=False)
                self._base = f"http://127.0.0.1:{port}"
                logger.info("Serve replica: the OpenAI app listens on %s", self._base)
        return self._base

    async def __call__(self, request: Request) -> Response:
        base = await self._start()
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.body()
        resp = await self._session.request(request.method, url, data=body, headers=headers)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        if resp.content_type == "text/event-stream":
            async def chunks():
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.close()  # the client left early: the inner request ends too, and is aborted

            return StreamingResponse(chunks(), status_code=resp.status, headers=out_headers)
        data = await resp.read()
        resp.release()
        return Response(data, status_code=resp.status, headers=out_headers)

    async def check_health(self) -> None:
        """Serve's health check: the engine's (a failed engine makes Serve replace this replica).
        Also starts the inner app, so the engine loop runs before the first request arrives."""
        from engine.entrypoints.openai.server import app_state

        await self._start()
        await app_state(self.app).engine.check_health()

    async def __del__(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()  # on_cleanup: the engine shuts down


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder ``serve run`` and examples/serve_config.yaml name
    (``engine.serve.deployment:build_app``). The arguments are checked here, before any replica starts."""
    server_namespace(args)
    return OpenAIServer.bind(dict(args))
