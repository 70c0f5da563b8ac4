"""Chained block hashes for automatic prefix caching.

A block's hash covers its parent's hash (hence the whole prefix before it), its own token ids and
``extra`` (anything else that changes its K/V, e.g. an adapter id). SHA-256 rather than Python's
``hash()``: a 64-bit non-cryptographic hash lets one user craft a prompt whose block collides with
another user's and read K/V computed from someone else's tokens (vLLM's CVE-2025-25183). Hits are
still verified against the stored tokens and parent hash, so a collision could never serve wrong K/V.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Hashable, Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = b"paged-engine/prefix-cache/v1"


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int], extra: Hashable = None) -> BlockHash:
    h = hashlib.sha256(ROOT_HASH if parent_hash is None else parent_hash)
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(repr(extra).encode())
    return h.digest()


def root_hash(salt: Hashable = None) -> BlockHash | None:
    """The parent hash of a sequence's first block: None (ROOT_HASH) for the base model, a hash of
    ``salt`` otherwise (a LoRA adapter's id), so sequences with different salts never share a block.
    Stored as the first block's ``parent_hash``, it is checked on every hit like any parent."""
    if salt is None:
        return None
    return hashlib.sha256(ROOT_HASH + b"/salt/" + repr(salt).encode()).digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, start: list[BlockHash] | None = None, extra: Hashable = None,
    root: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``, extending the already known ``start`` list;
    the first block's parent is ``root`` (see :func:`root_hash`)."""
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else root
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra))
    return hashes
