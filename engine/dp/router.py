"""Which data-parallel replica takes a request: least outstanding work, unless a replica's prefix
cache probably already holds the request's leading full blocks.

The router cannot see the replicas' caches (they live in other processes and change every step),
so it keeps its own record: for each replica, the chained block hashes (engine/block_manager/
hashing.py, the same hashes the replicas' prefix caches use) of the full prompt blocks it routed
there, as a bounded LRU. A request whose first k blocks are in a replica's record is a prefix hit of
length k there. The record can be wrong in one direction only: the replica may have evicted blocks
the router still lists (a hit that turns out partial), never the other way.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from engine.block_manager.hashing import BlockHash, block_hashes, root_hash

DEFAULT_RECORD_BLOCKS = 16384  # hashes remembered per replica (32 bytes each: 512 KiB)
DEFAULT_IMBALANCE = 4  # a prefix hit wins while its replica has at most this many more sequences in flight


@dataclass
class PrefixRecord:
    """The block hashes routed to one replica, least recently routed first."""

    capacity: int = DEFAULT_RECORD_BLOCKS
    hashes: "OrderedDict[BlockHash, None]" = field(default_factory=OrderedDict)

    def matched(self, chain: Sequence[BlockHash]) -> int:
        """How many leading blocks of ``chain`` this replica was sent (a chained hash implies its prefix)."""
        n = 0
        for h in chain:
            if h not in self.hashes:
                break
            n += 1
        return n

    def add(self, chain: Sequence[BlockHash]) -> None:
        for h in chain:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)

    def clear(self) -> None:
        self.hashes.clear()


@dataclass(frozen=True)
class RouteDecision:
    replica: int
    matched_blocks: int  # leading full blocks the chosen replica was already sent (0: no prefix hit)
    chain: tuple[BlockHash, ...]  # the request's full-block hashes (recorded once it is placed)


@dataclass
class PrefixAwareRouter:
    """Picks a replica for each request; ``record`` is called once the replica took it."""

    num_replicas: int
    block_size: int
    capacity: int = DEFAULT_RECORD_BLOCKS
    imbalance: int = DEFAULT_IMBALANCE
    records: list[PrefixRecord] = field(init=False)
    routed: list[int] = field(init=False)  # requests placed on each replica
    prefix_hits: list[int] = field(init=False)  # of those, placed where part of their prefix was

    def __post_init__(self) -> None:
        self.records = [PrefixRecord(self.capacity) for _ in range(self.num_replicas)]
        self.routed = [0] * self.num_replicas
        self.prefix_hits = [0] * self.num_replicas

    def chain(self, token_ids: Sequence[int], salt: Hashable = None) -> tuple[BlockHash, ...]:
        """The full-block hash chain of a prompt (``salt``: a LoRA adapter's id, as the KV cache salts it)."""
        return tuple(block_hashes(token_ids, self.block_size, root=root_hash(salt)))

    def choose(self, token_ids: Sequence[int], loads: dict[int, int], salt: Hashable = None,
               exclude: frozenset[int] = frozenset()) -> RouteDecision:
        """``loads``: sequences in flight on each replica that can take requests now (no other
        index is chosen). The longest prefix match wins if its replica is at most ``imbalance``
        sequences busier than the least loaded one; otherwise the least loaded."""
        candidates = {i: n for i, n in loads.items() if i not in exclude}
        if not candidates:
            raise LookupError("no replica can take the request")
        chain = self.chain(token_ids, salt)
        least = min(candidates.values())
        # equal loads (idle replicas): the one given fewer requests so far, so sequential traffic alternates
        best, best_match = min(candidates, key=lambda i: (candidates[i], self.routed[i], i)), 0
        if chain:
            for i in sorted(candidates):
                m = self.records[i].matched(chain)
                if m > best_match and candidates[i] <= least + self.imbalance:
                    best, best_match = i, m
        return RouteDecision(best, best_match, chain)

    def record(self, decision: RouteDecision) -> None:
        i = decision.replica
        self.routed[i] += 1
        self.prefix_hits[i] += decision.matched_blocks > 0
        self.records[i].add(decision.chain)

    def forget(self, replica: int) -> None:
        """The replica restarted (an empty cache): nothing routed there before counts."""
        self.records[replica].clear()

    @property
    def hit_rate(self) -> float:
        total = sum(self.routed)
        return sum(self.prefix_hits) / total if total else 0.0
