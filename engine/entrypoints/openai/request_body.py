"""Reading a request body as JSON without any input reaching a 500: strict UTF-8, no lone
surrogates, bounded nesting, bounded integer size.

``json.loads`` alone lets through lone surrogates (``"\\ud800"``, which tokenizers and UTF-8
encoders then refuse), raises RecursionError on deep nesting and ValueError on integers past
Python's int-string limit. Surrogates and nesting are a 400 here; an integer of more than
MAX_INT_DIGITS digits becomes an infinite float, so the field reading it reports it (a 400 naming
the field: "must be an integer", "must be a finite number") and a field the server ignores stays
harmless. NaN and Infinity are left to the field readers too (every number field checks finiteness).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from engine.entrypoints.openai.protocol import OpenAIError

MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 64  # 2**64 has 20 digits: anything a request field can take, with room to spare

# a JSON escape of a surrogate code point; the decoded text can only hold a lone surrogate if the
# body has one of these (strict UTF-8 decoding refuses encoded surrogates)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _parse_int(text: str) -> int | float:
    if len(text) > MAX_INT_DIGITS:  # never int(): past 4300 digits it raises, and it is slow
        return -math.inf if text[0] == "-" else math.inf
    return int(text)


def parse_json_body(raw: bytes) -> Any:
    """The body as a JSON value; any input it cannot take raises OpenAIError (400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenAIError(f"The request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise OpenAIError(f"The request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, and whatever else the decoder refuses
        raise OpenAIError(f"We could not parse the JSON body of your request: {_ascii(str(e))}") from None
    opens = text.count("[") + text.count("{")
    if opens > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(text):
        check_json_value(value)
    return value


def check_json_value(value: Any) -> None:
    """Walks a decoded value (iteratively: no recursion on user input); raises for nesting deeper
    than MAX_JSON_DEPTH and for strings (keys too) holding lone surrogates, naming the place."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise OpenAIError(
                    f"The request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)",
                    param=path or None,
                )
            if isinstance(v, dict):
                for k, item in v.items():
                    _check_text(k, path)
                    if isinstance(item, (str, list, dict)):
                        stack.append((item, f"{path}.{k}" if path else k, depth + 1))
            else:
                for i, item in enumerate(v):
                    if isinstance(item, (str, list, dict)):
                        stack.append((item, f"{path}[{i}]", depth + 1))


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        where = _ascii(path) or "the body"
        raise OpenAIError(
            f"'{where}' holds an invalid Unicode string: a lone surrogate (U+{ord(s[e.start]):04X}) "
            f"at character {e.start}", param=_ascii(path) or None,
        ) from None


def has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _ascii(s: str) -> str:
    """Text safe for any error message (lone surrogates escaped)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")
