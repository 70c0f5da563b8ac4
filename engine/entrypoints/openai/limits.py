"""Per-request size limits (each a server flag) and the counters of what admission refused.

The limits are checked on the raw JSON before any field is parsed, so an oversized list costs no
more than counting it. A request with ``n`` samples carries its per-sample state n times, so the
sizes multiplied by ``n`` are bounded too (``max_request_items``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from engine.entrypoints.openai.protocol import OpenAIError

DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
# OpenAI takes 4 stop strings; the automaton for 64 x 256 characters builds in about 50 ms
DEFAULT_MAX_STOP_STRINGS = 64
DEFAULT_MAX_STOP_STRING_LENGTH = 256
DEFAULT_MAX_LOGIT_BIAS = 1024
DEFAULT_MAX_REQUEST_ITEMS = 131072

# fields that hold token-id lists of one sample's state
_ID_LISTS = ("stop_token_ids", "allowed_token_ids")


class LimitError(OpenAIError):
    """A 400 for a request over one of the server's size limits; ``flag`` names the limit."""

    def __init__(self, message: str, *, param: str | None, flag: str, code: str) -> None:
        super().__init__(f"{message} (the server's {flag})", param=param, code=code)
        self.flag = flag


@dataclass(frozen=True)
class RequestLimits:
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_stop_string_length: int = DEFAULT_MAX_STOP_STRING_LENGTH
    max_token_ids: int = 65536  # per token-id list (stop_token_ids, allowed_token_ids, /detokenize)
    max_logit_bias: int = DEFAULT_MAX_LOGIT_BIAS
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS  # n x (stop strings + token ids + logit_bias + bad_words)

    def check_body(self, data: Any, *, prompts_field: str | None = None) -> None:
        """Raises LimitError for the first limit ``data`` (a decoded request body) exceeds; fields
        of the wrong type are left to the field readers."""
        if not isinstance(data, dict):
            return
        n = data.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if prompts_field is not None:
            prompts = data.get(prompts_field)
            num = len(prompts) if isinstance(prompts, list) and prompts and not _is_ids(prompts) else 1
            if num * n > self.max_prompts_per_request:
                what = f"{num} prompts" if n == 1 else f"{num} prompts x n={n}"
                raise LimitError(f"'{prompts_field}' asks for {what} sequences; the limit is "
                                 f"{self.max_prompts_per_request}", param=prompts_field,
                                 flag="--max-prompts-per-request", code="array_above_max_length")
        items = 0
        stop = data.get("stop")
        if isinstance(stop, list):
            self._check_len("stop", len(stop), self.max_stop_strings, "--max-stop-strings")
            items += len(stop)
            stops = stop
        else:
            stops = [stop]
        for i, s in enumerate(stops):
            if isinstance(s, str) and len(s) > self.max_stop_string_length:
                raise LimitError(f"'stop' string {i} has {len(s)} characters; the limit is "
                                 f"{self.max_stop_string_length}", param="stop",
                                 flag="--max-stop-string-length", code="string_above_max_length")
        for name in _ID_LISTS:
            ids = data.get(name)
            if isinstance(ids, list):
                self.check_token_ids(name, len(ids))
                items += len(ids)
        bias = data.get("logit_bias")
        if isinstance(bias, dict):
            self._check_len("logit_bias", len(bias), self.max_logit_bias, "--max-logit-bias", "entries")
            items += len(bias)
        words = data.get("bad_words")
        if isinstance(words, list):
            self._check_len("bad_words", len(words), self.max_stop_strings, "--max-stop-strings")
            items += len(words)
        if n * items > self.max_request_items:
            raise LimitError(f"n={n} x {items} stop strings, token ids and logit_bias entries = {n * items} "
                             f"items; the limit is {self.max_request_items}", param="n",
                             flag="--max-request-items", code="limit_exceeded")

    def check_token_ids(self, name: str, count: int) -> None:
        self._check_len(name, count, self.max_token_ids, "--max-token-ids")

    @staticmethod
    def _check_len(name: str, count: int, limit: int, flag: str, what: str = "items") -> None:
        if count > limit:
            code = "object_above_max_properties" if what == "entries" else "array_above_max_length"
            raise LimitError(f"'{name}' has {count} {what}; the limit is {limit}", param=name, flag=flag, code=code)


def _is_ids(v: list) -> bool:
    return isinstance(v[0], int) and not isinstance(v[0], bool)


@dataclass
class Rejections:
    """Requests and connections refused by admission, by reason (the metric
    ``vllm:admission_rejections_total{reason=...}``)."""

    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


REJECTION_REASONS = ("queue_full", "too_many_connections", "request_limit", "shutting_down")
