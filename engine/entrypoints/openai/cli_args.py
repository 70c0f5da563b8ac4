"""Flags of ``python -m engine serve`` beyond the engine's own (vLLM's names where vLLM has one)."""
from __future__ import annotations

import argparse

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")

    def add(flag: str, **kwargs) -> None:
        # an engine flag of the same name (e.g. a future --max-logprobs) wins; the server reads it too
        if flag not in parser._option_string_actions:
            group.add_argument(flag, **kwargs)

    add("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    add("--port", type=int, default=8000)
    add("--served-model-name", nargs="+", default=None,
        help="model name(s) clients use; the first is reported in responses (default: --model)")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    add("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    add("--response-role", default="assistant", help="role of generated chat messages")
    add("--max-logprobs", type=int, default=20, help="most top logprobs a request may ask for")
    add("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413")
    add("--disable-log-stats", action="store_true", help="do not log engine throughput periodically")
    add("--log-stats-interval", type=float, default=5.0, help="seconds between throughput log lines")
    add("--disable-log-requests", action="store_true", help="do not write an access-log line per request")
