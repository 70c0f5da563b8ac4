"""Unit tests of the block pool and KV cache manager (no model)."""
from __future__ import annotations

import pytest

from engine.block_manager.block_pool import BlockPool
from engine.block_manager.hashing import hash_block
from engine.block_manager.kv_cache_manager import KVCacheManager
from tests.scheduler_sim import make_request

BS = 4


def admit(kv: KVCacheManager, req, caching_lookup: bool = True) -> bool:
    """Admits a fresh request the way the scheduler does: prefix hits, then the rest."""
    hits = kv.get_computed_blocks(req) if caching_lookup else []
    num_computed = len(hits) * BS
    ok = kv.allocate_slots(req, req.num_tokens - num_computed, hits)
    if ok:
        req.num_computed_tokens = req.num_tokens
    return ok


def test_allocation_and_growth_across_block_boundaries():
    kv = KVCacheManager(8, BS)
    req = make_request("a", [1, 2, 3])
    assert admit(kv, req)
    assert len(req.block_ids) == 1 and kv.num_free_blocks == 7
    for tok, blocks in [(4, 1), (5, 2), (6, 2), (7, 2), (8, 2), (9, 3)]:
        req.append_output_token(tok)
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        assert len(req.block_ids) == blocks, (tok, req.block_ids)
        kv.check_invariants()
    assert len(set(req.block_ids)) == 3
    kv.free(req)
    assert kv.num_free_blocks == 8 and req.block_ids == []
    kv.check_invariants()


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(3, BS, enable_caching=False)
    big = make_request("big", list(range(13)))  # needs 4 blocks
    assert not kv.allocate_slots(big, 13)
    assert kv.num_free_blocks == 3 and "big" not in kv.tables
    small = make_request("s", list(range(12)))
    assert kv.allocate_slots(small, 12)
    assert kv.num_free_blocks == 0
    kv.check_invariants()


def test_prefix_hit_reuses_full_blocks_and_recomputes_last_token():
    kv = KVCacheManager(16, BS)
    prompt = list(range(100, 112))  # exactly 3 blocks
    a = make_request("a", prompt)
    assert admit(kv, a)
    b = make_request("b", prompt)
    hits = kv.get_computed_blocks(b)
    # the whole prompt is cached, but its last token must be computed for logits: 2 blocks hit
    assert [h.block_id for h in hits] == a.block_ids[:2]
    assert kv.allocate_slots(b, 12 - 8, hits)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert all(kv.pool.blocks[i].ref_count == 2 for i in a.block_ids[:2])
    kv.check_invariants()

    c = make_request("c", prompt[:8] + [7, 7, 7, 7, 7])  # shares 2 blocks then diverges
    assert len(kv.get_computed_blocks(c)) == 2
    d = make_request("d", [999] + prompt[1:])  # first block differs -> the chain breaks at once
    assert kv.get_computed_blocks(d) == []


def test_prefix_shorter_than_a_block_never_hits():
    kv = KVCacheManager(8, BS)
    a = make_request("a", [1, 2, 3, 50])
    assert admit(kv, a)
    b = make_request("b", [1, 2, 3, 60, 61])  # 3 shared tokens < one block
    assert kv.get_computed_blocks(b) == []


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(8)) + [99])  # 3 blocks, 2 full
    assert admit(kv, a)
    held = list(a.block_ids)
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.pool.num_cached_blocks == 2
    again = make_request("a2", list(range(8)) + [98])
    hits = kv.get_computed_blocks(again)
    assert [h.block_id for h in hits] == held[:2]
    # an unrelated request that needs every block evicts the cached ones (uncached free blocks go first)
    other = make_request("o", list(range(200, 216)))
    assert admit(kv, other, caching_lookup=False)
    assert kv.get_computed_blocks(again) == []
    assert kv.pool.num_evictions == 2
    kv.check_invariants()


def test_eviction_order_prefers_uncached_then_oldest():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[0], b"h0", None, (0,))
    pool.cache_block(blocks[1], b"h1", None, (1,))
    pool.free([blocks[0]])
    pool.free([blocks[1]])
    pool.free([blocks[2]])  # uncached: handed out before any cached block
    (first,) = pool.allocate(1)
    assert first is blocks[2]
    (second,) = pool.allocate(1)
    assert second is blocks[0] and b"h0" not in pool.cached  # oldest cached block evicted first
    assert b"h1" in pool.cached


def test_cache_hit_is_verified_against_tokens_and_parent():
    kv = KVCacheManager(8, BS)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    block = kv.pool.blocks[a.block_ids[0]]
    h = block.block_hash
    assert h == hash_block(None, (1, 2, 3, 4))
    # forge a collision: the index says h, but the block holds other tokens -> no hit
    block.token_ids = (9, 9, 9, 9)
    b = make_request("b", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(b) == []
    block.token_ids = (1, 2, 3, 4)
    block.parent_hash = b"not-the-root"
    assert kv.get_computed_blocks(b) == []


def test_prompt_logprobs_requests_get_no_hits():
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(9)))
    assert admit(kv, a)
    b = make_request("b", list(range(9)))
    b.sampling_params.prompt_logprobs = 1
    assert kv.get_computed_blocks(b) == []


def test_copy_on_write_for_a_shared_partial_block():
    kv = KVCacheManager(8, BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6])  # block 1 partially filled (5, 6)
    assert admit(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6])
    kv.fork(a, b, 5)  # b keeps tokens 0..4 and recomputes token 5 (the last prompt token)
    b.num_computed_tokens = 5
    assert b.block_ids == a.block_ids
    kv.check_invariants()
    assert kv.blocks_to_allocate(b, 1) == 1  # one copy
    assert kv.allocate_slots(b, 1)
    ops = kv.take_block_ops()
    assert ops.copy == [(a.block_ids[1], b.block_ids[1])]
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]
    assert kv.take_rewritten() == {"b"}
    # a now holds its partial block alone: writing into it needs no copy
    a.append_output_token(7)
    assert kv.blocks_to_allocate(a, 1) == 0
    assert kv.allocate_slots(a, 1) and kv.take_block_ops().copy == []
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


@pytest.mark.parametrize("caching", [False, True])
def test_swap_out_and_in_moves_blocks_through_host_memory(caching):
    kv = KVCacheManager(4, BS, enable_caching=caching, num_host_blocks=3)
    a = make_request("a", list(range(7)))  # one full block and a partial one
    assert admit(kv, a)
    old = list(a.block_ids)
    assert kv.can_swap_out(a)
    kv.swap_out(a)
    assert kv.num_free_blocks == 4 and kv.is_swapped(a) and a.block_ids == []
    ops = kv.take_block_ops()
    assert [d for d, _ in ops.swap_out] == old
    host = [h for _, h in ops.swap_out]
    kv.check_invariants()
    assert kv.swap_in_blocks_needed(a) == 2  # a revived cached block also takes a free block
    kv.swap_in(a)
    ops = kv.take_block_ops()
    if caching:  # the full block is still cached on the device: only the partial one is copied
        assert a.block_ids[0] == old[0] and ops.swap_in == [(host[1], a.block_ids[1])]
        assert kv.stats.swap_in_cache_hits == 1 and kv.stats.swapped_in_blocks == 1
    else:
        assert [h for h, _ in ops.swap_in] == host and [d for _, d in ops.swap_in] == a.block_ids
        assert kv.stats.swapped_in_blocks == 2
    assert kv.host_pool.num_free_blocks == 3 and not kv.is_swapped(a)
    kv.check_invariants()
    big = make_request("b", list(range(20)))
    assert not kv.can_swap_out(big)  # nothing computed, nothing to swap


def test_swap_in_after_eviction_copies_everything_back():
    kv = KVCacheManager(4, BS, num_host_blocks=3)
    a = make_request("a", list(range(9)))  # two full blocks
    assert admit(kv, a)
    kv.swap_out(a)
    kv.take_block_ops()
    other = make_request("o", list(range(100, 116)))  # takes every block: a's cached copies are evicted
    assert admit(kv, other, caching_lookup=False)
    kv.free(other)
    kv.swap_in(a)
    assert len(kv.take_block_ops().swap_in) == 3 and kv.stats.swap_in_cache_hits == 0
    kv.check_invariants()


def test_free_of_a_swapped_request_returns_host_blocks():
    kv = KVCacheManager(4, BS, num_host_blocks=2)
    a = make_request("a", list(range(6)))
    assert admit(kv, a)
    kv.swap_out(a)
    assert kv.host_pool.num_free_blocks == 0
    kv.free(a)
    assert kv.host_pool.num_free_blocks == 2 and kv.num_free_blocks == 4
    kv.check_invariants()


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(9)))
    assert admit(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == []


def test_pool_rejects_double_free():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])
    with pytest.raises(ValueError):
        BlockPool(0)


def test_runner_block_ops_read_before_overwrite():
    """The runner copies swap-outs, then copy-on-write, then swap-ins: a block freed by a swap-out
    or a copy-on-write and handed out again in the same step is read before it is overwritten."""
    import torch

    from engine.scheduler.output import SchedulerOutput
    from engine.worker.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.device = torch.device("cpu")
    k = torch.arange(4.0).view(4, 1, 1, 1).repeat(1, 2, 1, 3)  # block i holds the value i
    runner.kv_caches = [(k, k.clone() + 10)]
    runner.host_kv_caches = [(torch.full((2, 2, 1, 3), -1.0), torch.full((2, 2, 1, 3), -1.0))]
    runner.host_kv_caches[0][0][1] = 7.0  # a swapped-out request's block waiting in host block 1
    runner.host_kv_caches[0][1][1] = 17.0
    so = SchedulerOutput(swap_out=[(0, 0)], copy_blocks=[(1, 0)], swap_in=[(1, 1)])
    runner._apply_block_ops(so)
    dk, dv = runner.kv_caches[0]
    hk, hv = runner.host_kv_caches[0]
    assert hk[0].unique().tolist() == [0.0] and hv[0].unique().tolist() == [10.0]  # read before the copy overwrote it
    assert dk[0].unique().tolist() == [1.0] and dv[0].unique().tolist() == [11.0]  # the copy read block 1 before the swap-in
    assert dk[1].unique().tolist() == [7.0] and dv[1].unique().tolist() == [17.0]
    assert dk[2].unique().tolist() == [2.0]
