"""Errors aiohttp raises before a request reaches the app (a malformed request line, a bad
Content-Length, a header over the size limit) answered in OpenAI's JSON error shape.

aiohttp writes those as plain text from ``RequestHandler.handle_error``; the connection's protocol
object is switched to the subclass below, which keeps aiohttp's logging and closing and replaces
only the body. The subclass adds no state (``__slots__ = ()``), so the switch is layout-safe.
"""
from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from engine.entrypoints.openai.error_body import error_bytes
from engine.entrypoints.openai.protocol import OpenAIError


class JsonErrorRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response already started
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        if status >= 500:
            err = OpenAIError("Internal server error", status=status, type="server_error")
        else:
            err = OpenAIError(f"{phrase}: {message or 'the request could not be parsed as HTTP/1.1'}",
                              status=status, code="malformed_http_request")
        code, body = error_bytes(err)
        resp = web.Response(body=body, status=code, content_type="application/json")
        resp.force_close()
        return resp


def json_errors(protocol: RequestHandler) -> RequestHandler:
    """The same connection protocol, answering framing errors in JSON."""
    if type(protocol) is RequestHandler:
        protocol.__class__ = JsonErrorRequestHandler
    return protocol
