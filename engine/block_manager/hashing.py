"""Chained block hashes for automatic prefix caching."""
from __future__ import annotations

from typing import Hashable, Sequence

ROOT_HASH = 0x5EED_B10C


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: Hashable = None) -> int:
    """A block's identity: its parent's hash (hence the whole prefix), its tokens, and anything else
    that changes its K/V (``extra``). Python hashes of int tuples are stable across processes."""
    return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(token_ids), extra))


def block_hashes(token_ids: Sequence[int], block_size: int, start: list[int] | None = None) -> list[int]:
    """Hashes of every full block of ``token_ids``, extending the already known ``start`` list."""
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes
