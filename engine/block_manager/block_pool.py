"""Physical KV blocks: reference counts, a free queue in LRU order, and the prefix-cache index."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.block_manager.hashing import BlockHash


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and registered in the cache
    parent_hash: BlockHash | None = None  # the hash of the block before it (None for a first block)
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
        self.cached: dict[BlockHash, int] = {}  # block hash -> block id
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-unreferenced ones included."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (referenced or not)."""
        return len(self.cached)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")  # callers check first
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
                self.num_evictions += 1
            block.block_hash = block.parent_hash = block.token_ids = None

    def lookup(self, block_hash: BlockHash, parent_hash: BlockHash | None, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block with this hash, if it really holds these tokens after this parent."""
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != token_ids or block.parent_hash != parent_hash:
            return None
        return block

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
                if block.block_hash is None:
                    # nothing worth keeping: hand it out before any cached block
                    self.free_queue[block.block_id] = None
                    self.free_queue.move_to_end(block.block_id, last=False)
                else:
                    self.free_queue[block.block_id] = None

    def cache_block(
        self, block: KVBlock, block_hash: BlockHash, parent_hash: BlockHash | None, token_ids: tuple[int, ...]
    ) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = token_ids
        # keep the first block cached under a hash; a duplicate stays private to its request
        self.cached.setdefault(block_hash, block.block_id)

    def reset_prefix_cache(self) -> bool:
        """Forgets every unreferenced cached block. Returns False (doing nothing) while blocks are
        in use, like vLLM: referenced blocks would otherwise lose their index entries."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            self._evict(block)
        return True


class HostBlockPool:
    """Host (CPU) memory blocks for preemption by swap; each is held by one swapped-out request."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = max(num_blocks, 0)
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} host blocks with {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))
