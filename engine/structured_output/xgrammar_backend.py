"""The xgrammar backend (https://github.com/mlc-ai/xgrammar): Earley-parser matchers with
precomputed token masks, compiled once per (kind, spec, tokenizer)."""
from __future__ import annotations

import json
import re
import threading
from typing import Any, Callable

import torch
import xgrammar as xgr

from engine.structured_output.backend import StructuredOutputBackend, StructuredOutputGrammar
from engine.structured_output.params import InvalidGrammarError, StructuredOutputsParams

_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+?:\d+:\s*")


def _clean(e: BaseException) -> str:
    """xgrammar's message without its C++ timestamp and file:line prefix."""
    msg = str(e).strip()
    msg = _CPP_PREFIX.sub("", msg)
    return msg.replace("Check failed: (error.empty()) is false: ", "")


def close_objects(schema: Any) -> Any:
    """``disable_additional_properties``: every object schema gets ``additionalProperties: false``."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and out.get("additionalProperties", True) is True:
        out["additionalProperties"] = False
    return out


def choice_ebnf(choices: list[str]) -> str:
    """``root ::= "a" | "b"``: JSON string escapes are also EBNF string escapes."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _schema_text(params: StructuredOutputsParams) -> str:
    schema = params.json if params.json_object is None else {"type": "object"}
    if isinstance(schema, str):
        schema = json.loads(schema)
    if params.disable_additional_properties:
        schema = close_objects(schema)
    return json.dumps(schema)


def _is_ebnf(text: str) -> bool:
    return "::=" in text


_BYTE_VOCAB = [bytes([b]) for b in range(256)] + [b"</s>"]  # every byte, and a stop token (id 256)
_byte_compiler: xgr.GrammarCompiler | None = None


def _can_start(grammar: xgr.Grammar) -> bool:
    """Whether some output can begin: the grammar compiled against a vocabulary of single bytes
    (which can spell any text) allows a first byte or stopping. Milliseconds, so it is decided
    before the request is queued; the compile for the real tokenizer checks again."""
    global _byte_compiler
    if _byte_compiler is None:
        _byte_compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(_BYTE_VOCAB, stop_token_ids=[256]), max_threads=1)
    matcher = xgr.GrammarMatcher(_byte_compiler.compile_grammar(grammar))
    mask = xgr.allocate_token_bitmask(1, len(_BYTE_VOCAB))
    matcher.fill_next_token_bitmask(mask)
    return bool(mask.any())


class XgrammarMatcher(StructuredOutputGrammar):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept_tokens(self, tokens: list[int]) -> bool:
        m = self.matcher
        return all(m.accept_token(t) for t in tokens)

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        m, n = self.matcher, 0
        for t in tokens:
            if not m.accept_token(t):
                break
            n += 1
            if m.is_terminated():  # a stop token: nothing may be proposed past the end
                n -= 1
                m.rollback(1)
                break
        if n:
            m.rollback(n)
        return tokens[:n]

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer_loader: Callable[[], Any], vocab_size: int, stop_token_ids: list[int],
                 tokenizer_key: str) -> None:
        self._load_tokenizer = tokenizer_loader
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._key = tokenizer_key
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer_key(self) -> str:
        return self._key

    def compiler(self) -> xgr.GrammarCompiler:
        """Built on first use (reading the vocabulary takes a few hundred ms), in a compile thread."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._load_tokenizer(), vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None
                )
                # our cache holds the compiled grammars; xgrammar's own would keep a second copy
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def warm(self) -> None:
        self.compiler()

    def check(self, params: StructuredOutputsParams) -> None:
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                grammar = xgr.Grammar.from_json_schema(_schema_text(params),
                                                       any_whitespace=not params.disable_any_whitespace)
            elif kind == "regex":
                grammar = xgr.Grammar.from_regex(params.regex)
            elif kind == "choice":
                grammar = xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
            elif kind == "grammar" and _is_ebnf(params.grammar):
                grammar = xgr.Grammar.from_ebnf(params.grammar)
            elif kind == "grammar":
                grammar = xgr.Grammar.from_lark(params.grammar)
            else:
                grammar = xgr.Grammar.from_structural_tag(_tag_text(params.structural_tag))
            if not _can_start(grammar):
                raise InvalidGrammarError(f"structured_outputs {kind} accepts no output at all: no token can start it",
                                          params.param)
        except InvalidGrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / its own types
            raise InvalidGrammarError(f"structured_outputs {kind} is invalid: {_clean(e)}", params.param) from None

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        comp, kind = self.compiler(), params.kind
        try:
            if kind in ("json", "json_object"):
                return comp.compile_json_schema(_schema_text(params), any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return comp.compile_regex(params.regex)
            if kind == "choice":
                return comp.compile_grammar(choice_ebnf(params.choice))
            if kind == "grammar":
                if _is_ebnf(params.grammar):
                    return comp.compile_grammar(params.grammar)
                return comp.compile_lark(params.grammar)
            return comp.compile_structural_tag(_tag_text(params.structural_tag))
        except Exception as e:  # noqa: BLE001
            raise InvalidGrammarError(f"structured_outputs {kind} is invalid: {_clean(e)}", params.param) from None

    def make_grammar(self, compiled: xgr.CompiledGrammar) -> XgrammarMatcher:
        return XgrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmasks(self, grammars: list[StructuredOutputGrammar], bitmask: torch.Tensor, rows: list[int]) -> None:
        if len(grammars) == 1:
            grammars[0].fill_bitmask(bitmask, rows[0])
            return
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, rows)


def _tag_text(tag: str | dict) -> str:
    return tag if isinstance(tag, str) else json.dumps(tag)
