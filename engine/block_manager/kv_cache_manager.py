"""Per-request block tables on top of the block pool, with automatic prefix caching."""
from __future__ import annotations

from dataclasses import dataclass

from engine.block_manager.block_pool import BlockPool, KVBlock
from engine.block_manager.hashing import block_hashes
from engine.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found cached


class KVCacheManager:
    """Hands out blocks to requests as their tokens are scheduled, and takes them back.

    A request's table is ``request.block_ids``; this manager also keeps the KVBlock objects so
    reference counts stay exact.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.tables: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # per request: leading blocks already registered
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest run of cached full blocks that prefixes the request's tokens.

        At least one token is always left to compute, so the model produces logits for it.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed (vLLM skips the cache too)
        request.block_hashes = block_hashes(request.all_token_ids, self.block_size, request.block_hashes)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            tokens = tuple(request.all_token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(h, tokens)
            if block is None:
                break
            hits.append(block)
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Makes room for ``num_new_tokens`` more tokens (plus lookahead slots for speculation).

        ``computed_blocks`` are prefix-cache hits to attach first (only when the request has no
        blocks yet). Returns False, changing nothing, when the pool cannot supply enough blocks.
        """
        table = self.tables.setdefault(request.request_id, [])
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead_tokens
        num_new_blocks = self.blocks_needed(total) - len(table) - len(computed_blocks)
        # reviving cached blocks that sit in the free queue also consumes free blocks
        num_revived = sum(1 for b in computed_blocks if b.ref_count == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            if not table:
                del self.tables[request.request_id]
            return False
        for block in computed_blocks:
            self.pool.touch(block)
        table.extend(computed_blocks)
        if computed_blocks:
            self.num_cached_blocks[request.request_id] = len(computed_blocks)
        if num_new_blocks > 0:
            table.extend(self.pool.allocate(num_new_blocks))
        request.block_ids = [b.block_id for b in table]
        self._cache_full_blocks(request, table, min(num_computed + num_new_tokens, request.num_tokens))
        return True

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens: int) -> None:
        """Registers blocks that are full once this step's tokens are written. Their K/V lands in
        this step's forward pass before any attention reads it, so later hits are safe."""
        if not self.enable_caching:
            return
        bs = self.block_size
        num_full = num_tokens // bs
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        request.block_hashes = block_hashes(request.all_token_ids[: num_full * bs], bs, request.block_hashes)
        for i in range(start, num_full):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.pool.cache_block(table[i], request.block_hashes[i], tokens)
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Returns all the request's blocks (tail first, so its prefix stays cached longest)."""
        table = self.tables.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(table)))
        request.block_ids = []

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
