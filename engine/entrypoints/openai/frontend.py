"""The built-in chat page: ``GET /`` and its two static files, served from package data.

No build step and nothing fetched from a CDN: the page is plain HTML, CSS and JavaScript that
talk to this server's own ``/v1/models``, ``/v1/chat/completions`` (streamed) and ``/metrics``.
The page itself needs no API key (it asks for one and keeps it in the tab's session storage);
with ``--api-key-all-routes`` it is protected like everything else. ``--disable-frontend``
leaves these routes out.
"""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

_DIR = Path(__file__).with_name("frontend")
# path -> (file, content type); a fixed table, so no request path reaches the filesystem
FILES = {
    "/": ("index.html", "text/html"),
    "/static/chat.js": ("chat.js", "application/javascript"),
    "/static/chat.css": ("chat.css", "text/css"),
}
FRONTEND_ROUTES = frozenset(FILES)


def add_frontend_routes(app: web.Application) -> None:
    for path, (name, content_type) in FILES.items():
        body = (_DIR / name).read_bytes()  # read once at start-up: a missing file fails the start

        async def serve(request: web.Request, body: bytes = body, content_type: str = content_type) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset="utf-8",
                                headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

        app.router.add_get(path, serve)
