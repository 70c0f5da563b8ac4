"""Stop-string matching whose cost per generated character does not grow with the number of stop
strings: one Aho-Corasick automaton per set of stop strings, shared by every sample (and request)
that uses the set; each detokenizer keeps only its current state.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

# building is pure Python: it lets other threads (the engine's step, the event loop) take the GIL
# this often, instead of holding it for whole switch intervals (5 ms) while they wait
_YIELD_EVERY = 256


@dataclass(frozen=True)
class StopMatcher:
    goto: tuple[dict[str, int], ...]  # state -> {character: next state}
    fail: tuple[int, ...]  # state -> longest proper suffix state
    # state -> the longest stop string ending here (own or through fail links), or ""
    longest: tuple[str, ...]
    rank: dict[str, int]  # stop string -> its place in the list (ties on the start go to the first)

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)

    def scan(self, state: int, text: str, start: int) -> tuple[int, tuple[int, str] | None]:
        """Feeds ``text`` from ``start``; returns the new state and (index, stop) of the match that
        begins earliest among those ending in the fed text, the first in the list on a tie (None
        if none)."""
        best: tuple[int, str] | None = None
        longest, rank = self.longest, self.rank
        for pos in range(start, len(text)):
            state = self.step(state, text[pos])
            s = longest[state]
            if s:
                idx = pos - len(s) + 1
                if best is None or idx < best[0] or (idx == best[0] and rank[s] < rank[best[1]]):
                    best = (idx, s)
        return state, best


@lru_cache(maxsize=64)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The automaton of a set of stop strings (cached: n samples and repeated requests share it)."""
    goto: list[dict[str, int]] = [{}]
    own: list[str] = [""]
    for k, s in enumerate(stops):
        if k:
            time.sleep(0)
        state = 0
        for ch in s:
            nxt = goto[state].get(ch)
            if nxt is None:
                nxt = len(goto)
                goto[state][ch] = nxt
                goto.append({})
                own.append("")
            state = nxt
        own[state] = s
    fail = [0] * len(goto)
    longest = list(own)
    queue = deque(goto[0].values())
    done = 0
    while queue:
        done += 1
        if done % _YIELD_EVERY == 0:
            time.sleep(0)
        state = queue.popleft()
        if not longest[state]:
            longest[state] = longest[fail[state]]
        for ch, nxt in goto[state].items():
            f = fail[state]
            while f and ch not in goto[f]:
                f = fail[f]
            cand = goto[f].get(ch, 0)
            fail[nxt] = cand if cand != nxt else 0
            queue.append(nxt)
    rank: dict[str, int] = {}
    for i, s in enumerate(stops):
        rank.setdefault(s, i)
    return StopMatcher(tuple(goto), tuple(fail), tuple(longest), rank)
