"""Flags of ``python -m engine serve`` beyond the engine's own (vLLM's names where vLLM has one)."""
from __future__ import annotations

import argparse

from engine.entrypoints.openai import limits as L

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
    add("--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health, /metrics and /version")
    add("--api-key-all-routes", action="store_true",
        help="with --api-key: protect /health, /metrics and /version too")
    add("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    add("--lora-modules", nargs="+", default=None,
        help='LoRA adapters served by name (needs --enable-lora): name=path or \'{"name": .., "path": .., '
             '"base_model_name": ..}\'; a request picks one with its "model" field')
    add("--allow-runtime-lora-updating", action="store_true",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    add("--response-role", default="assistant", help="role of generated chat messages")
    add("--max-logprobs", type=int, default=20, help="most top logprobs a request may ask for")
    add("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413")
    add("--disable-frontend", action="store_true", help="do not serve the chat page at GET /")
    add("--disable-log-stats", action="store_true", help="do not log engine throughput periodically")
    add("--log-stats-interval", type=float, default=5.0, help="seconds between throughput log lines")
    add("--disable-log-requests", action="store_true", help="do not write an access-log line per request")
    # back-pressure and request size limits (a 429 / 503 / 400 that names the flag)
    add("--max-num-queued-requests", type=int, default=None,
        help="429 with Retry-After while this many sequences wait for the engine (default: no cap)")
    add("--max-concurrent-connections", type=int, default=None,
        help="further connections get 503 (default: 2048, fewer under a low open-files limit)")
    add("--max-prompts-per-request", type=int, default=L.DEFAULT_MAX_PROMPTS_PER_REQUEST,
        help="most prompts x n one completion request may ask for")
    add("--max-stop-strings", type=int, default=L.DEFAULT_MAX_STOP_STRINGS, help="most stop (and bad_words) strings")
    add("--max-stop-string-length", type=int, default=L.DEFAULT_MAX_STOP_STRING_LENGTH,
        help="longest stop string, in characters")
    add("--max-token-ids", type=int, default=None,
        help="longest token-id list (stop_token_ids, allowed_token_ids, /detokenize; "
             "default: the larger of the vocabulary size and max_model_len)")
    add("--max-logit-bias", type=int, default=L.DEFAULT_MAX_LOGIT_BIAS, help="most logit_bias entries")
    add("--max-request-items", type=int, default=L.DEFAULT_MAX_REQUEST_ITEMS,
        help="most n x (stop strings + token ids + logit_bias entries) one request may carry")
    # slow clients and shutdown
    add("--timeout-keep-alive", type=float, default=5.0,
        help="seconds an idle connection, or one whose request head has not arrived, stays open")
    add("--request-read-timeout", type=float, default=30.0, help="seconds a request body may take to arrive")
    add("--shutdown-timeout", type=float, default=10.0,
        help="on SIGTERM, seconds requests in flight get to finish before they are ended with an error")
    # chat
    add("--chat-template-content-format", choices=["auto", "string", "openai"], default="auto",
        help="how message content reaches the chat template: one string, or OpenAI's list of parts")
    add("--chat-split-special-tokens", action="store_true",
        help="tokenize user and tool content with special tokens split, so that control tokens come "
             "only from the chat template")
    # tool calling and reasoning (vLLM's flags)
    add("--enable-auto-tool-choice", action="store_true",
        help="parse tool calls the model writes on its own (tool_choice \"auto\"); needs --tool-call-parser")
    add("--tool-call-parser", default=None,
        help="how tool calls look in the model's output: hermes, llama3_json, mistral, pythonic")
    add("--reasoning-parser", default=None,
        help="split <think>...</think> into reasoning_content: deepseek_r1, qwen3")
    add("--max-stored-responses", type=int, default=1024,
        help="/v1/responses with store: how many responses previous_response_id can continue (oldest evicted)")
