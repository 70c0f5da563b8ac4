"""``deepseek_r1`` and ``qwen3``: the text before ``</think>`` is reasoning, the rest the answer.

DeepSeek-R1's templates often put ``<think>`` in the prompt, so the model's output may start inside
the reasoning: ``deepseek_r1`` takes everything up to ``</think>`` as reasoning (an output that never
closes it is all reasoning). Qwen3 writes ``<think>`` itself when thinking is on and nothing when it
is off: ``qwen3`` sees reasoning only in an output that starts with ``<think>``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from engine.entrypoints.openai.tool_parsers.base import held_back

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str
    content: str
    ended: bool  # the reasoning is over: what follows is the answer


class ReasoningParser(ABC):
    name: ClassVar[str] = ""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def parse(self, text: str, final: bool) -> ReasoningSplit: ...


def _split_after_start(body: str, final: bool) -> ReasoningSplit:
    j = body.find(THINK_END)
    if j < 0:
        keep = 0 if final else held_back(body, (THINK_END,))
        return ReasoningSplit(body[:len(body) - keep], "", False)
    return ReasoningSplit(body[:j], body[j + len(THINK_END):], True)


_REGISTRY: dict[str, type[ReasoningParser]] = {}


def _register(name: str) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
    def wrap(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def reasoning_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {sorted(_REGISTRY)}") from None


@_register("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    def parse(self, text: str, final: bool) -> ReasoningSplit:
        if text.startswith(THINK_START):
            text = text[len(THINK_START):]
        elif not final and THINK_START.startswith(text):
            return ReasoningSplit("", "", False)  # may still be the opening tag
        return _split_after_start(text, final)


@_register("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    def parse(self, text: str, final: bool) -> ReasoningSplit:
        if text.startswith(THINK_START):
            return _split_after_start(text[len(THINK_START):], final)
        if not final and THINK_START.startswith(text):
            return ReasoningSplit("", "", False)
        return ReasoningSplit("", text, True)
