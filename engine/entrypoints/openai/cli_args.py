"""Flags of ``python -m engine serve`` beyond the engine's own (vLLM's names where vLLM has one)."""
from __future__ import annotations

import argparse

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use; the first is reported in responses (default: --model)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    g.add_argument("--response-role", default="assistant", help="role of generated chat messages")
    g.add_argument("--max-logprobs", type=int, default=20, help="most top logprobs a request may ask for")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413")
    g.add_argument("--disable-log-stats", action="store_true", help="do not log engine throughput periodically")
    g.add_argument("--log-stats-interval", type=float, default=5.0, help="seconds between throughput log lines")
    g.add_argument("--disable-log-requests", action="store_true", help="do not write an access-log line per request")
