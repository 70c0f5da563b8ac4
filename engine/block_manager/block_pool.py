"""Physical KV blocks: reference counts, a free queue in LRU order, and the prefix-cache index."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and cached
    token_ids: tuple[int, ...] | None = None  # the tokens it holds, to verify cache hits


class BlockPool:
    """Owns every block. A block with ref_count 0 sits in the free queue; if it is cached it keeps
    its contents there and can be revived by a prefix hit until it is handed out again (evicted).
    The queue is LRU: blocks freed earliest are handed out first."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")  # caller checks first
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block.block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
            self.num_evictions += 1

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> KVBlock | None:
        """Returns the cached block with this hash and exactly these tokens, if any."""
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == token_ids else None

    def touch(self, block: KVBlock) -> None:
        """Takes one more reference on a (possibly free, cached) block."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drops one reference on each block; blocks reaching zero join the tail of the free queue.
        Pass a request's blocks tail first so its prefix stays cached longest."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...]) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        # keep the first block cached under a hash; a duplicate stays private to its request
        self.cached.setdefault(block_hash, block.block_id)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                self._evict(block)
