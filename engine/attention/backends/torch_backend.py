"""The CPU attention backend: batched decode over gathered blocks, one SDPA call per prefill."""
from __future__ import annotations

import torch

from engine.attention.backends.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.kernels import torch_ref


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        torch_ref.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        if nd == meta.num_requests:
            return torch_ref.paged_decode_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_decode_seq_len
            )
        out = torch.empty_like(query)
        if nd:
            out[:nd] = torch_ref.paged_decode_attention(
                query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale, meta.max_decode_seq_len
            )
        qsl = meta.query_start_loc_host[nd:]
        base = qsl[0]
        out[base:] = torch_ref.paged_prefill_attention(
            query[base:],
            k_cache,
            v_cache,
            meta.block_tables[nd:],
            [x - base for x in qsl],
            meta.seq_lens_host[nd:],
            scale,
            key=key[base:],
            value=value[base:],
        )
        return out
