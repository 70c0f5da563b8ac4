"""What a request asks its output to match: vLLM's ``StructuredOutputsParams`` (same field names).

Exactly one constraint kind per request. ``json`` takes a schema dict, a JSON string or a pydantic
model class (its ``model_json_schema()`` is used); ``grammar`` takes EBNF / GBNF text;
``structural_tag`` takes xgrammar's structural-tag JSON (a string or a dict).
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class InvalidGrammarError(ValueError):
    """A constraint that cannot be compiled (bad schema, regex or grammar, an unsupported keyword,
    an empty choice list, or no token that can start it). ``param`` names the request field at
    fault (the server reports it as OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = "structured_outputs") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_fallback: bool = False  # accepted for vLLM compatibility: there is one backend to fall to
    disable_any_whitespace: bool = False  # JSON: no free whitespace between tokens (compact output)
    disable_additional_properties: bool = False  # JSON: objects get additionalProperties: false
    whitespace_pattern: str | None = None  # JSON: accepted for vLLM compatibility (see docs)
    # set by the engine: the canonical text of the constraint, the grammar cache key's spec
    _spec: str = field(default="", repr=False, compare=False)
    # the request field errors name (the server sets "response_format..."); default structured_outputs.<kind>
    _param: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.json, type):  # a pydantic model class
            schema = getattr(self.json, "model_json_schema", None)
            if schema is None:
                raise InvalidGrammarError("structured_outputs json must be a schema dict, a JSON string or a "
                                          f"pydantic model, got the class {self.json.__name__}", "structured_outputs.json")
            self.json = schema()
        if self.choice is not None and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        if self.json_object is False:
            self.json_object = None
        self.validate()
        self._spec = self._canonical()

    @property
    def kind(self) -> str:
        """The one constraint kind set: a name in KINDS."""
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        return self._spec or self._canonical()

    @property
    def param(self) -> str:
        return self._param or f"structured_outputs.{self.kind}"

    def validate(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) is not None]
        if not set_kinds:
            raise InvalidGrammarError(f"structured_outputs sets no constraint; give one of {', '.join(KINDS)}")
        if len(set_kinds) > 1:
            raise InvalidGrammarError(
                f"structured_outputs sets both {set_kinds[0]!r} and {set_kinds[1]!r}; give exactly one constraint kind"
            )
        kind = set_kinds[0]
        value = getattr(self, kind)
        p = f"structured_outputs.{kind}"
        if kind == "json" and not isinstance(value, (str, dict)):
            raise InvalidGrammarError(f"structured_outputs json must be a schema dict or a JSON string, "
                                      f"got {type(value).__name__}", p)
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value.strip()):
            raise InvalidGrammarError(f"structured_outputs {kind} must be a non-empty string", p)
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise InvalidGrammarError("structured_outputs choice must be a non-empty list of strings", p)
            if any(not isinstance(c, str) or c == "" for c in value):
                raise InvalidGrammarError("structured_outputs choice must hold non-empty strings", p)
        if kind == "json_object" and value is not True:
            raise InvalidGrammarError("structured_outputs json_object must be true", p)
        if kind == "structural_tag" and not isinstance(value, (str, dict)):
            raise InvalidGrammarError("structured_outputs structural_tag must be a JSON string or an object", p)
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidGrammarError(f"structured_outputs {name} must be a bool", f"structured_outputs.{name}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise InvalidGrammarError("structured_outputs whitespace_pattern must be a string",
                                      "structured_outputs.whitespace_pattern")

    def _canonical(self) -> str:
        """The constraint as one string: equal constraints give equal strings (the cache key)."""
        kind, value = self.kind, getattr(self, self.kind)
        if kind in ("json", "structural_tag"):
            if isinstance(value, str):
                try:
                    value = _json.loads(value)
                except ValueError as e:
                    raise InvalidGrammarError(f"structured_outputs {kind} is not valid JSON: {e}",
                                              f"structured_outputs.{kind}") from None
            if kind == "json" and not isinstance(value, (dict, bool)):
                raise InvalidGrammarError("structured_outputs json must be a JSON schema object",
                                          "structured_outputs.json")
            text = _json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            text = _json.dumps(value)
        elif kind == "json_object":
            text = "object"
        else:
            text = value
        opts = f"ws={int(not self.disable_any_whitespace)},ap={int(self.disable_additional_properties)}"
        return f"{opts}|{text}" if kind in ("json", "json_object") else text

    @classmethod
    def from_dict(cls, data: dict[str, Any], param: str = "structured_outputs") -> "StructuredOutputsParams":
        """From a JSON object (the server's ``structured_outputs`` field); unknown keys are an error."""
        if not isinstance(data, dict):
            raise InvalidGrammarError(f"'{param}' must be an object", param)
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidGrammarError(f"'{param}' has unknown field(s) {unknown}; known: {sorted(known)}",
                                      f"{param}.{unknown[0]}")
        return cls(**{k: v for k, v in data.items() if v is not None or k in KINDS})
