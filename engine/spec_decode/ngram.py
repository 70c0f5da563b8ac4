"""N-gram prompt lookup: propose the tokens that followed the most recent earlier occurrence of
the request's last n tokens (the longest n in [prompt_lookup_min, prompt_lookup_max] that occurs).

Each request keeps an incremental index per n: n-gram -> end of its most recent occurrence that
has a following token, so a step costs O(new tokens * number of n), not a scan of the sequence.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.spec_decode.proposer import DraftRequest, Drafts, Proposer


@dataclass
class NgramIndex:
    """The n-grams of one token sequence, updated as it grows (sequences only ever grow)."""

    min_n: int
    max_n: int
    # n -> n-gram -> end (exclusive) of its most recent occurrence that has a following token
    last_end: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    num_indexed: int = 0  # n-grams ending at e < num_indexed are in the index

    def update(self, tokens: list[int]) -> None:
        # an n-gram ending at e (exclusive) is indexed once tokens[e] exists
        for e in range(max(self.num_indexed, 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self.last_end.setdefault(n, {})[tuple(tokens[e - n : e])] = e
        self.num_indexed = max(self.num_indexed, len(tokens))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest suffix seen before (most recent match)."""
        if k <= 0:
            return []
        self.update(tokens)
        total = len(tokens)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            end = self.last_end.get(n, {}).get(tuple(tokens[total - n :]))
            if end is not None:
                return tokens[end : end + k]
        return []


def find_ngram_proposal(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Reference implementation (a plain scan); the tests check NgramIndex against it."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :]
        for end in range(total - 1, n - 1, -1):  # most recent occurrence first, excluding the suffix itself
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        self.k = num_speculative_tokens
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, requests: list[DraftRequest]) -> Drafts:
        out = Drafts()
        for req in requests:
            idx = self.indexes.get(req.req_id)
            if idx is None:
                idx = self.indexes[req.req_id] = NgramIndex(self.min_n, self.max_n)
            out.token_ids.append(idx.propose(req.token_ids, min(self.k, req.max_drafts)))
            out.probs.append(None)
        return out

    def forget(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.indexes.pop(rid, None)
