"""Prompts and a cached transformers reference shared by the prefix-caching and preemption tests."""
from __future__ import annotations

import functools
from pathlib import Path

SYSTEM = (
    "You are a careful assistant for a library. Answer in one short sentence, be precise, and never "
    "invent titles. The library opens at nine and closes at six; members may borrow five books."
)
QUESTIONS = [
    "When does the library open?",
    "How many books may a member borrow?",
    "When does it close?",
    "Should you invent titles?",
]
MAX_TOKENS = 16


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(f"{SYSTEM}\nQuestion: {q}\nAnswer:") for q in QUESTIONS]


@functools.lru_cache(maxsize=2)
def hf_reference(model_path: Path, prompts: tuple[tuple[int, ...], ...]) -> list[dict]:
    from tests.conftest import hf_greedy

    return hf_greedy(model_path, [list(p) for p in prompts], MAX_TOKENS)
