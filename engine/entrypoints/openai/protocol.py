"""OpenAI's error schema and strict readers for JSON request fields.

Every user mistake becomes an ``OpenAIError`` that the server turns into
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, before any streaming starts.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any

_MISSING = object()


class OpenAIError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_int() -> int:
    return int(time.time())


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__
    )


class Body:
    """A parsed JSON object with typed, range-checked getters; ``null`` means "use the default"."""

    def __init__(self, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise OpenAIError(f"the request body must be a JSON object, not {_type_name(data)}")
        self.data = data
        self.prefix = prefix

    def _param(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _bad(self, name: str, msg: str) -> OpenAIError:
        return OpenAIError(f"'{self._param(name)}' {msg}", param=self._param(name))

    def raw(self, name: str, default: Any = None) -> Any:
        v = self.data.get(name, _MISSING)
        return default if v is _MISSING or v is None else v

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def required(self, name: str) -> Any:
        v = self.data.get(name)
        if v is None:
            raise OpenAIError(f"'{self._param(name)}' is a required property", param=self._param(name))
        return v

    def int(self, name: str, default: Any = None, lo: int | None = None, hi: int | None = None) -> Any:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(name, f"must be an integer, got {_type_name(v)}")
        self._check_range(name, v, lo, hi)
        return v

    def float(self, name: str, default: Any = None, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> Any:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self._bad(name, f"must be a number, got {_type_name(v)}")
        try:
            v = float(v)  # a huge JSON integer overflows here
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise self._bad(name, f"must be a finite number, got {v}")
        if lo_open and lo is not None and v <= lo:
            raise self._bad(name, f"must be greater than {lo:g}, got {v:g}")
        self._check_range(name, v, None if lo_open else lo, hi)
        return v

    def _check_range(self, name: str, v: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and v < lo:
            raise self._bad(name, f"must be at least {lo:g}, got {v:g}")
        if hi is not None and v > hi:
            raise self._bad(name, f"must be at most {hi:g}, got {v:g}")

    def bool(self, name: str, default: Any = None) -> Any:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            raise self._bad(name, f"must be a boolean, got {_type_name(v)}")
        return v

    def str(self, name: str, default: Any = None) -> Any:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, str):
            raise self._bad(name, f"must be a string, got {_type_name(v)}")
        return v

    def obj(self, name: str) -> "Body | None":
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return None
        if not isinstance(v, dict):
            raise self._bad(name, f"must be an object, got {_type_name(v)}")
        return Body(v, prefix=f"{self._param(name)}.")

    def stop(self, name: str = "stop") -> list[str]:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise self._bad(name, "must be a string or an array of strings")
        if any(s == "" for s in v):
            raise self._bad(name, "must not contain empty strings")
        return v

    def int_list(self, name: str) -> list[int] | None:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return None
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise self._bad(name, "must be an array of integers")
        return v

    def logit_bias(self, name: str = "logit_bias") -> dict[int, float] | None:
        v = self.raw(name, _MISSING)
        if v is _MISSING:
            return None
        if not isinstance(v, dict):
            raise self._bad(name, f"must be an object mapping token ids to numbers, got {_type_name(v)}")
        out = {}
        for k, b in v.items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise self._bad(name, f"keys must be token ids, got {k!r}") from None
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not -100 <= b <= 100:
                raise self._bad(name, f"values must be numbers in [-100, 100], got {b!r}")
            out[tid] = float(b)
        return out

    def stream_options(self, stream: bool) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats); stream_options without stream is an error."""
        opts = self.obj("stream_options")
        if opts is None:
            return False, False
        if not stream:
            raise self._bad("stream_options", "is only allowed when 'stream' is true")
        return opts.bool("include_usage", False), opts.bool("continuous_usage_stats", False)
