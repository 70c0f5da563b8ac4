"""The stop-string automaton finds exactly what scanning every stop string finds, and a detokenizer
with thousands of stop strings costs per token what one with a few does."""
from __future__ import annotations

import random

from engine.core.stop_strings import stop_matcher


def _reference(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest-starting stop string that ends in text[new_from:], the first listed on a tie."""
    best = None
    for s in stops:
        idx = text.find(s, max(new_from - len(s) + 1, 0))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def test_automaton_equals_scanning_every_stop_string():
    rng = random.Random(0)
    for _ in range(3000):
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6)))
        m = stop_matcher(stops)
        text, state, scanned = "", 0, 0
        for _ in range(12):
            before = len(text)
            text += "".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
            state, got = m.scan(state, text, scanned)
            scanned = len(text)
            assert got == _reference(text, before, stops), (stops, text, before)
            if got:
                break


def test_one_automaton_per_stop_set_is_shared():
    stops = tuple(f"stop-{i}" for i in range(1000))
    assert stop_matcher(stops) is stop_matcher(tuple(list(stops)))
