"""The CPU backend's decode path: requests grouped by context length and gathered into a reused
workspace must give what the plain reference gives (one padded gather over the whole batch)."""
from __future__ import annotations

import torch

from engine.attention.backends.torch_backend import TorchAttentionBackend, plan_decode_groups
from engine.kernels import torch_ref
from tests.kernels.paged import make_metadata, make_paged_cache


def _decode_step(seq_lens: list[int], gen: torch.Generator, h: int = 6, kvh: int = 2, d: int = 32, bs: int = 16):
    cache = make_paged_cache(seq_lens, bs, kvh, d, torch.float32, gen)
    meta = make_metadata(cache, [1] * len(seq_lens), num_decodes=len(seq_lens))
    query = torch.randn((len(seq_lens), h, d), generator=gen)
    key, value = (torch.randn((len(seq_lens), kvh, d), generator=gen) for _ in range(2))
    return cache, meta, query, key, value


def _reference(cache, meta, query, key, value):
    k, v = cache.k_cache.clone(), cache.v_cache.clone()
    torch_ref.write_kv(key, value, k, v, meta.slot_mapping)
    return torch_ref.paged_decode_attention(query, k, v, meta.block_tables, meta.seq_lens, 0.125)


def test_groups_bound_padding_and_cover_every_row_once():
    gen = torch.Generator().manual_seed(0)
    lens = [300, 1, 17, 160, 16, 299, 40, 90]
    _, meta, *_ = _decode_step(lens, gen)
    groups = plan_decode_groups(meta)
    rows = sorted(r for g in groups for r in g.rows.tolist())
    assert rows == list(range(len(lens)))
    assert len(groups) > 1
    for g in groups:
        own = [lens[r] for r in g.rows.tolist()]
        assert g.length >= max(own) and min(own) >= 0.5 * max(own)  # at most half of a group is padding
        assert g.block_ids.numel() == g.num_rows * g.num_blocks


def test_equal_lengths_need_no_mask_and_no_reordering():
    gen = torch.Generator().manual_seed(1)
    _, meta, *_ = _decode_step([37, 37, 37], gen)
    (g,) = plan_decode_groups(meta)
    assert g.rows is None and g.mask is None and g.length == 37


def test_grouped_decode_matches_the_reference_across_steps():
    """Two steps through one backend: the second, with shorter contexts, reuses a workspace that still
    holds the first step's blocks, which must never leak into its result."""
    gen = torch.Generator().manual_seed(2)
    backend = TorchAttentionBackend()
    for lens in ([300, 1, 17, 160, 16, 299, 40, 90], [5, 3, 33, 12], [64]):
        cache, meta, query, key, value = _decode_step(lens, gen)
        expected = _reference(cache, meta, query, key, value)
        got = backend.forward(query, key, value, cache.k_cache, cache.v_cache, meta, 0.125)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_decode_and_prefill_step_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    h, kvh, d = 6, 2, 32
    seq_lens, query_lens = [200, 9, 70, 30], [1, 1, 25, 30]
    cache = make_paged_cache(seq_lens, 16, kvh, d, torch.float32, gen)
    meta = make_metadata(cache, query_lens, num_decodes=2)
    t = sum(query_lens)
    query, key, value = (torch.randn((t, n, d), generator=gen) for n in (h, kvh, kvh))
    k, v = cache.k_cache.clone(), cache.v_cache.clone()
    torch_ref.write_kv(key, value, k, v, meta.slot_mapping)
    expected = torch.cat([
        torch_ref.paged_decode_attention(query[:2], k, v, meta.block_tables[:2], meta.seq_lens[:2], 0.125),
        torch_ref.paged_prefill_attention(query[2:], k, v, meta.block_tables[2:], [0, 25, 55], seq_lens[2:], 0.125),
    ])
    got = TorchAttentionBackend().forward(query, key, value, cache.k_cache, cache.v_cache, meta, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k_cache, k, rtol=0, atol=0)
