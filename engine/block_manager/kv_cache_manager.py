"""Per-request block tables on top of the block pool: prefix caching, sharing with copy-on-write,
and swapping to host memory.

Block operations the workers must carry out before the step's forward pass (swap-outs, swap-ins,
copy-on-write copies) are queued here and collected by the scheduler with ``take_block_ops``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_manager.block_pool import BlockPool, HostBlockPool, KVBlock
from engine.block_manager.hashing import block_hashes, hash_block, root_hash
from engine.block_manager.stats import KVCacheStats
from engine.request import Request


@dataclass
class KVCacheCounters:
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens served from cached blocks
    shared_prompt_tokens: int = 0  # n > 1: prompt tokens a sample took from its first sibling
    cow_copies: int = 0  # blocks copied because a request wrote into a shared block
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0  # blocks copied back from host memory
    swap_in_cache_hits: int = 0  # blocks a swap-in found still cached on the device (no copy)


@dataclass
class BlockOps:
    """Copies the workers run before the forward pass, in the order swap_out, copy, swap_in."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) device blocks
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)


class KVCacheInvariantError(RuntimeError):
    """The block accounting is inconsistent (a bug in the engine, never a user error)."""


class KVCacheManager:
    """Hands out blocks to requests as their tokens are scheduled, and takes them back.

    A request's table is ``tables[request_id]`` (``request.kv_blocks`` is that same list and
    ``request.block_ids`` reads it: no second copy); this manager keeps the KVBlock objects so reference
    counts stay exact. A block may appear in several tables (prefix hits, n > 1 sharing): it is
    reference counted, and a request about to write into a block it shares gets its own copy first.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.host_pool = HostBlockPool(num_host_blocks)
        self.enable_caching = enable_caching
        self.tables: dict[str, list[KVBlock]] = {}
        self.host_tables: dict[str, list[int]] = {}  # swapped-out requests
        self.num_cached_blocks: dict[str, int] = {}  # per request: leading blocks already registered
        self.stats = KVCacheCounters()
        self._ops = BlockOps()
        self._rewritten: set[str] = set()  # requests whose table changed other than by appending
        # host blocks a swap-in of this step reads: free only once the step's ops are taken, since
        # the worker runs every swap-out before any swap-in (a swap-out into one would overwrite it)
        self._host_reading: list[int] = []

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.host_pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self.host_tables

    # ---- prefix caching --------------------------------------------------------------------
    def _hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        request.block_hashes = block_hashes(
            request.all_token_ids[:num_tokens], self.block_size, request.block_hashes, root=_root(request)
        )
        return request.block_hashes

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest run of cached full blocks that prefixes the request's tokens.

        At least one token is always left to compute, so the model produces logits for it. Requests
        that want prompt logprobs need every prompt position computed, so they get no hits.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hashes = self._hashes(request, max_blocks * bs)
        hits: list[KVBlock] = []
        parent = _root(request)  # an adapter's blocks chain from its own root: never shared across adapters
        for i in range(max_blocks):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(hashes[i], parent, tokens)
            if block is None:
                break
            hits.append(block)
            parent = hashes[i]
        return hits

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.prefix_queries += num_tokens
        self.stats.prefix_hits += num_hit_tokens

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens: int) -> None:
        """Registers blocks that are full once this step's tokens are written. Their K/V lands in
        this step's forward pass, and attention backends write the whole step's K/V before reading
        any of it, so a request admitted later in the same step may already hit them."""
        if not self.enable_caching:
            return
        bs = self.block_size
        num_full = min(num_tokens // bs, len(table))
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes(request, num_full * bs)
        for i in range(start, num_full):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.pool.cache_block(table[i], hashes[i], hashes[i - 1] if i else _root(request), tokens)
        self.num_cached_blocks[request.request_id] = num_full

    # ---- allocation ------------------------------------------------------------------------
    def _cow_indices(self, table: list[KVBlock], start_token: int, end_token: int) -> list[int]:
        """Table positions in the write range [start_token, end_token) that other tables share."""
        if end_token <= start_token:
            return []
        first = start_token // self.block_size
        last = min((end_token - 1) // self.block_size, len(table) - 1)
        return [i for i in range(first, last + 1) if table[i].ref_count > 1]

    def blocks_to_allocate(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> int:
        """How many free blocks ``allocate_slots`` would consume."""
        table = self.tables.get(request.request_id, [])
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead_tokens
        num_new_blocks = max(self.blocks_needed(total) - len(table) - len(computed_blocks), 0)
        # reviving cached blocks that sit in the free queue also consumes free blocks
        num_revived = sum(1 for b in computed_blocks if b.ref_count == 0)
        num_cow = len(self._cow_indices(table, num_computed, total))
        return num_new_blocks + num_revived + num_cow

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
        reserve: int = 0,
    ) -> bool:
        """Makes room for ``num_new_tokens`` more tokens (plus lookahead slots for speculation).

        ``computed_blocks`` are prefix-cache hits to attach first (only when the request has no
        blocks yet). Blocks in the write range that other requests share are copied first
        (copy-on-write). Returns False, changing nothing, when fewer than the needed blocks plus
        ``reserve`` are free.
        """
        computed_blocks = computed_blocks or []
        need = self.blocks_to_allocate(request, num_new_tokens, computed_blocks, num_lookahead_tokens)
        if need + reserve > self.pool.num_free_blocks:
            return False
        rid = request.request_id
        table = self.tables.setdefault(rid, [])
        if computed_blocks:
            if table:
                raise RuntimeError(f"prefix hits attached to {rid}, which already holds blocks")
            for block in computed_blocks:
                self.pool.touch(block)
            table.extend(computed_blocks)
            self.num_cached_blocks[rid] = len(computed_blocks)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead_tokens
        for i in self._cow_indices(table, num_computed, total):
            src = table[i]
            (dst,) = self.pool.allocate(1)
            self._ops.copy.append((src.block_id, dst.block_id))
            self.pool.free([src])
            table[i] = dst
            self.stats.cow_copies += 1
            self._rewritten.add(rid)
        num_new_blocks = self.blocks_needed(total) - len(table)
        if num_new_blocks > 0:
            table.extend(self.pool.allocate(num_new_blocks))
        request.kv_blocks = table
        self._cache_full_blocks(request, table, min(num_computed + num_new_tokens, request.num_tokens))
        return True

    def fork(self, source: Request, request: Request, num_tokens: int) -> None:
        """Lets ``request`` share the blocks holding ``source``'s first ``num_tokens`` tokens (the
        same prompt, for n > 1). A later write into a shared partial block copies it first."""
        if request.request_id in self.tables:
            raise RuntimeError(f"cannot fork into {request.request_id}: it already holds blocks")
        shared = self.tables[source.request_id][: self.blocks_needed(num_tokens)]
        for block in shared:
            self.pool.touch(block)
        self.tables[request.request_id] = list(shared)
        self.num_cached_blocks[request.request_id] = min(
            self.num_cached_blocks.get(source.request_id, 0), num_tokens // self.block_size
        )
        request.block_hashes = list(source.block_hashes[: num_tokens // self.block_size])
        request.kv_blocks = self.tables[request.request_id]
        self.stats.shared_prompt_tokens += num_tokens

    # ---- swapping --------------------------------------------------------------------------
    def can_swap_out(self, request: Request) -> bool:
        n = self.blocks_needed(request.num_computed_tokens)
        return 0 < n <= self.host_pool.num_free_blocks

    def swap_out(self, request: Request) -> None:
        """Moves the request's computed K/V to host blocks and frees its device blocks."""
        rid = request.request_id
        table = self.tables.pop(rid)
        keep = self.blocks_needed(request.num_computed_tokens)
        host = self.host_pool.allocate(keep)
        self._ops.swap_out.extend((b.block_id, h) for b, h in zip(table, host))
        self.host_tables[rid] = host
        self.num_cached_blocks.pop(rid, None)
        self.pool.free(list(reversed(table)))
        self.stats.swapped_out_blocks += keep
        request.kv_blocks = []

    def _swap_in_hits(self, request: Request) -> list[KVBlock]:
        """Leading full blocks of a swapped-out request still cached on the device (often its own,
        freed at swap-out and not yet evicted): they need no copy back."""
        if not self.enable_caching:
            return []
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(self.host_tables.get(request.request_id, ())))
        hashes = self._hashes(request, num_full * bs)
        hits: list[KVBlock] = []
        for i in range(num_full):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(hashes[i], hashes[i - 1] if i else _root(request), tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def swap_in_blocks_needed(self, request: Request) -> int:
        """Free device blocks ``swap_in`` consumes."""
        hits = self._swap_in_hits(request)
        num_revived = sum(1 for b in hits if b.ref_count == 0)
        return len(self.host_tables.get(request.request_id, ())) - len(hits) + num_revived

    def swap_in(self, request: Request) -> None:
        """Gives a swapped-out request device blocks again: cached ones where the device still has
        them, fresh ones filled by copies from host memory for the rest."""
        rid = request.request_id
        hits = self._swap_in_hits(request)
        host = self.host_tables.pop(rid)
        for block in hits:
            self.pool.touch(block)
        fresh = self.pool.allocate(len(host) - len(hits))
        self._ops.swap_in.extend((h, b.block_id) for h, b in zip(host[len(hits) :], fresh))
        self._host_reading.extend(host)
        table = hits + fresh
        self.tables[rid] = table
        # the copied full blocks are registered again (under their hashes) when allocate_slots runs
        self.num_cached_blocks[rid] = len(hits)
        self._rewritten.add(rid)
        self.stats.swapped_in_blocks += len(fresh)
        self.stats.swap_in_cache_hits += len(hits)
        request.kv_blocks = table

    # ---- release ---------------------------------------------------------------------------
    def free(self, request: Request) -> None:
        """Returns all the request's device and host blocks (device tail first, so its prefix
        stays cached longest)."""
        rid = request.request_id
        table = self.tables.pop(rid, [])
        self.num_cached_blocks.pop(rid, None)
        self.pool.free(list(reversed(table)))
        self.host_pool.free(self.host_tables.pop(rid, []))
        self._rewritten.discard(rid)
        request.kv_blocks = []

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ---- per step --------------------------------------------------------------------------
    def take_block_ops(self) -> BlockOps:
        ops, self._ops = self._ops, BlockOps()
        self.host_pool.free(self._host_reading)  # their swap-ins are in ops now, ahead of any later swap-out
        self._host_reading = []
        return ops

    def take_rewritten(self) -> set[str]:
        """Requests whose block table changed in place since the last call (CoW, swap-in)."""
        out, self._rewritten = self._rewritten, set()
        return out

    def get_stats(self) -> "KVCacheSnapshot":
        """A point-in-time KVCacheStats (engine/block_manager/stats.py) of the pools and counters."""

        pool, counters = self.pool, self.stats
        return KVCacheStats(
            kv_blocks_total=pool.num_blocks,
            kv_blocks_free=pool.num_free_blocks,
            kv_blocks_used=pool.num_used_blocks,
            kv_blocks_cached=pool.num_cached_blocks,
            kv_cache_usage=pool.usage(),
            kv_host_blocks_total=self.host_pool.num_blocks,
            kv_host_blocks_free=self.host_pool.num_free_blocks,
            prefix_cache_queries=counters.prefix_queries,
            prefix_cache_hits=counters.prefix_hits,
            prefix_cache_evictions=pool.num_evictions,
            shared_prompt_tokens=counters.shared_prompt_tokens,
            cow_copies=counters.cow_copies,
            swapped_out_blocks=counters.swapped_out_blocks,
            swapped_in_blocks=counters.swapped_in_blocks,
            swap_in_cache_hits=counters.swap_in_cache_hits,
        )

    # ---- checking --------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raises KVCacheInvariantError if the accounting is inconsistent. For tests and debugging."""

        def fail(msg: str) -> None:
            raise KVCacheInvariantError(msg)

        pool = self.pool
        refs = [0] * pool.num_blocks
        for rid, table in self.tables.items():
            if len({b.block_id for b in table}) != len(table):
                fail(f"{rid} holds a block twice")
            for b in table:
                refs[b.block_id] += 1
        free_ids = set(pool.free_queue)
        if len(free_ids) + sum(1 for r in refs if r) != pool.num_blocks:
            fail(f"free {len(free_ids)} + used {sum(1 for r in refs if r)} != total {pool.num_blocks}")
        for block in pool.blocks:
            if block.ref_count != refs[block.block_id]:
                fail(f"block {block.block_id}: ref_count {block.ref_count}, held by {refs[block.block_id]} tables")
            if (block.block_id in free_ids) != (block.ref_count == 0):
                fail(f"block {block.block_id}: ref_count {block.ref_count} but in free queue: {block.block_id in free_ids}")
            if block.block_hash is not None:
                if block.token_ids is None or len(block.token_ids) != self.block_size:
                    fail(f"cached block {block.block_id} is not full")
                if hash_block(block.parent_hash, block.token_ids) != block.block_hash:
                    fail(f"cached block {block.block_id}: hash does not match its tokens")
        for h, block_id in pool.cached.items():
            if pool.blocks[block_id].block_hash != h:
                fail(f"cache index maps a hash to block {block_id}, which holds another")
        host_held = [h for t in self.host_tables.values() for h in t] + self._host_reading
        if len(set(host_held)) != len(host_held):
            fail("a host block is held twice")
        if len(host_held) + self.host_pool.num_free_blocks != self.host_pool.num_blocks:
            fail("host blocks are not conserved")
        if set(host_held) & set(self.host_pool._free):
            fail("a host block is both free and held")


def _root(request: Request) -> bytes | None:
    """The parent hash of the request's first block: salted by its LoRA adapter, if any."""
    return root_hash(request.lora_int_id)
