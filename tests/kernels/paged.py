"""Builders of random paged KV caches and step metadata for the kernel and backend tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata

GARBAGE = 30.0  # fill of never-allocated cache slots: finite (the torch reference multiplies masked
# values by 0) but large enough that reading one by mistake moves the output far beyond tolerance


@dataclass
class PagedCache:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32


def make_paged_cache(
    seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    gen: torch.Generator, spare_blocks: int = 3,
) -> PagedCache:
    """Each request gets randomly scattered blocks; slots past a request's length hold GARBAGE, and block
    0 (the table padding value) is never allocated, so it holds GARBAGE too."""
    nblocks = [(n + block_size - 1) // block_size for n in seq_lens]
    total = sum(nblocks) + spare_blocks + 1
    shape = (total, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, GARBAGE, dtype=dtype)
    v_cache = torch.full(shape, -GARBAGE, dtype=dtype)
    perm = (torch.randperm(total - 1, generator=gen) + 1).tolist()
    width = max(nblocks) + 2
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for i, (n, nb) in enumerate(zip(seq_lens, nblocks)):
        blocks = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        flat_k = k_cache[blocks].flatten(0, 1)
        flat_v = v_cache[blocks].flatten(0, 1)
        flat_k[:n] = torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)
        flat_v[:n] = torch.randn((n, num_kv_heads, head_dim), generator=gen).to(dtype)
        k_cache[blocks] = flat_k.view(nb, block_size, num_kv_heads, head_dim)
        v_cache[blocks] = flat_v.view(nb, block_size, num_kv_heads, head_dim)
    return PagedCache(k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32))


def slot_mapping_for(cache: PagedCache, query_lens: list[int], pad_tokens: int = 0) -> torch.Tensor:
    """Slots of each request's last ``query_len`` positions, then ``pad_tokens`` padded (-1) entries."""
    bs = cache.k_cache.shape[1]
    slots: list[int] = []
    for i, (n, q) in enumerate(zip(cache.seq_lens.tolist(), query_lens)):
        for pos in range(n - q, n):
            slots.append(int(cache.block_tables[i, pos // bs]) * bs + pos % bs)
    slots += [-1] * pad_tokens
    return torch.tensor(slots, dtype=torch.int64)


def make_metadata(cache: PagedCache, query_lens: list[int], num_decodes: int, pad_tokens: int = 0) -> AttentionMetadata:
    seq_lens = cache.seq_lens.tolist()
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    return AttentionMetadata(
        slot_mapping=slot_mapping_for(cache, query_lens, pad_tokens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=cache.seq_lens,
        block_tables=cache.block_tables,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        max_decode_seq_len=max(seq_lens[:num_decodes]) if num_decodes else 0,
        block_size=cache.k_cache.shape[1],
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens,
    )
