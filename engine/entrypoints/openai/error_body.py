"""The one way an error leaves the server: OpenAI's JSON error object, built so that it cannot fail.

Messages may quote user input (a model name, a stop string); the body is ASCII-escaped JSON, so
even text holding lone surrogates encodes, and anything unexpected falls back to a fixed body.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from aiohttp import web

from engine.entrypoints.openai.protocol import OpenAIError

_FALLBACK = (b'{"error": {"message": "Internal server error", "type": "server_error", '
             b'"param": null, "code": null}}')


class RateLimitError(OpenAIError):
    """429 with a Retry-After header: the server is full, the client should come back later."""

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str = "rate_limit_exceeded",
                 status: int = 429) -> None:
        super().__init__(message, status=status, type="rate_limit_exceeded", code=code)
        self.headers = {"Retry-After": str(retry_after_s)}


def error_bytes(err: OpenAIError) -> tuple[int, bytes]:
    """(status, body) for an error; never raises."""
    try:
        status = int(err.status)
        if not 400 <= status <= 599:
            status = 500
        return status, json.dumps(err.to_dict(), ensure_ascii=True).encode("ascii")
    except Exception:  # noqa: BLE001 - the error path must not fail
        return 500, _FALLBACK


def safe_error_response(err: OpenAIError, headers: Mapping[str, str] | None = None) -> web.Response:
    status, body = error_bytes(err)
    hdrs: dict[str, Any] = dict(getattr(err, "headers", None) or {})
    hdrs.update(headers or {})
    try:
        return web.Response(body=body, status=status, content_type="application/json", headers=hdrs)
    except Exception:  # noqa: BLE001
        return web.Response(body=_FALLBACK, status=500, content_type="application/json")


def sse_error(err: OpenAIError) -> bytes:
    """An in-band error event for a stream whose headers are already out."""
    return b"data: " + error_bytes(err)[1] + b"\n\n"
