"""The interface a structured-output backend implements (xgrammar today; llguidance could be added
without touching the scheduler or the runner).

The engine process holds the backend: it parses and compiles grammars (in the manager's thread
pool), makes one matcher per request and fills the step's token bitmask. The bitmask format is
shared by every backend: int32 words, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is
allowed; workers apply it without knowing which backend made it (engine/structured_output/apply.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from engine.structured_output.params import StructuredOutputsParams


class StructuredOutputGrammar(ABC):
    """One request's position in its grammar (a matcher)."""

    @abstractmethod
    def accept_tokens(self, tokens: list[int]) -> bool:
        """Advances by ``tokens``; False (and nothing more accepted) at the first one the grammar
        rejects."""

    @abstractmethod
    def validate_tokens(self, tokens: list[int]) -> list[int]:
        """The longest prefix of ``tokens`` the grammar accepts without ending; the state is left
        as it was (for speculative proposals)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undoes the last ``num_tokens`` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into ``bitmask[row]``."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the grammar has ended (accepted its stop token): nothing more may follow."""


class StructuredOutputBackend(ABC):
    """Compiles constraints for one tokenizer and makes matchers for them."""

    name: str = ""

    @abstractmethod
    def check(self, params: StructuredOutputsParams) -> None:
        """Parses the constraint without compiling it against the vocabulary (fast, any thread);
        raises InvalidGrammarError naming the field."""

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled constraint (opaque to callers; shared by every request with the same key);
        raises InvalidGrammarError. Runs in the manager's compile threads."""

    @abstractmethod
    def make_grammar(self, compiled: Any) -> StructuredOutputGrammar:
        """A fresh matcher at the start of ``compiled``."""

    @abstractmethod
    def fill_bitmasks(self, grammars: list[StructuredOutputGrammar], bitmask: torch.Tensor, rows: list[int]) -> None:
        """``grammars[i].fill_bitmask(bitmask, rows[i])`` for all, in one call where the backend can."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def tokenizer_key(self) -> str:
        """Names the tokenizer the grammars are compiled for (part of the cache key)."""

    def warm(self) -> None:
        """Builds what every compile needs (the vocabulary's tables) before the first one starts; a
        compile's time limit counts from after this."""

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """``num_rows`` rows, every token allowed."""
        return torch.full((num_rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def shutdown(self) -> None:
        """Releases what it holds."""


def make_backend(name: str, tokenizer_loader: Any, vocab_size: int, stop_token_ids: list[int],
                 tokenizer_key: str) -> StructuredOutputBackend:
    """The backend ``name`` (a resolved name: "xgrammar")."""
    if name == "xgrammar":
        from engine.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(tokenizer_loader, vocab_size, stop_token_ids, tokenizer_key)
    raise ValueError(f"unknown structured outputs backend {name!r}")
