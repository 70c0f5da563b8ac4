"""``structured_outputs_config`` (``--structured-outputs-config '{"backend": "xgrammar"}'``)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

BACKENDS = ("auto", "xgrammar")


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"  # "auto" picks xgrammar
    # a grammar still compiling after this many seconds fails its requests (the thread is abandoned)
    compile_timeout_s: float = 10.0
    max_compile_threads: int = 2  # the compile pool's threads
    cache_size: int = 512  # compiled grammars kept (least recently used ones are dropped)
    # defaults for the JSON kinds, which a request's own flags can only switch on
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"structured_outputs_config backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not (isinstance(self.compile_timeout_s, (int, float)) and self.compile_timeout_s > 0):
            raise ValueError(f"structured_outputs_config compile_timeout_s must be > 0, got {self.compile_timeout_s!r}")
        if not (isinstance(self.max_compile_threads, int) and self.max_compile_threads >= 1):
            raise ValueError("structured_outputs_config max_compile_threads must be an integer >= 1")
        if not (isinstance(self.cache_size, int) and self.cache_size >= 1):
            raise ValueError("structured_outputs_config cache_size must be an integer >= 1")

    @property
    def resolved_backend(self) -> str:
        return "xgrammar" if self.backend == "auto" else self.backend

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | "StructuredOutputsConfig" | None) -> "StructuredOutputsConfig":
        if raw is None:
            return cls()
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"structured_outputs_config must be a dict, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"structured_outputs_config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**raw)
