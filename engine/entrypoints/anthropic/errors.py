"""Anthropic's error shape: ``{"type": "error", "error": {"type": ..., "message": ...}}``, with the
error type that goes with each HTTP status (what the ``anthropic`` client maps to its exceptions)."""
from __future__ import annotations

import json

from aiohttp import web

from engine.entrypoints.openai.error_body import RateLimitError
from engine.entrypoints.openai.protocol import OpenAIError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                else "invalid_request_error"), "message": message}}


def anthropic_error_response(err: OpenAIError) -> web.Response:
    """An OpenAIError (what every field reader raises) answered in Anthropic's shape; ASCII-escaped
    so any user text quoted in the message is safe."""
    message = err.message if err.param is None or err.param in err.message else f"{err.message} ({err.param})"
    headers = err.headers if isinstance(err, RateLimitError) else {}
    return web.Response(text=json.dumps(error_body(err.status, message), ensure_ascii=True), status=err.status,
                        content_type="application/json", headers=headers)
