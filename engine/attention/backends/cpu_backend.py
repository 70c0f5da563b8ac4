"""The fp32 CPU attention backend: KV writes and decode attention in C (engine/kernels/cpu), prefills
through SDPA as in the torch backend.

The decode kernel reads each request's K/V straight from its blocks (no gather into a workspace)
and each KV head once for its whole GQA group of query heads: at 64 requests of 128-256 tokens of
context a layer's decode attention drops from ~4 ms to ~0.7 ms (docs/performance.md). Any other dtype or
layout falls back to the torch backend it extends.
"""
from __future__ import annotations

import torch

from engine.attention.backends.base import StepReplay
from engine.attention.backends.torch_backend import TorchAttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.kernels import torch_ref
from engine.kernels.cpu.ops import CpuFp32Kernels, fp32_cpu_kernels, heads_contiguous
from engine.kernels.cpu.plan import empty


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"
    step_replay = StepReplay.KERNEL_PLAN

    def __init__(self, kernels: CpuFp32Kernels) -> None:
        super().__init__()
        self.kernels = kernels

    def _usable(self, query, key, value, k_cache, meta: AttentionMetadata) -> bool:
        if fp32_cpu_kernels(query, key, value, k_cache) is None:
            return False
        group = query.shape[1] // k_cache.shape[2]
        return (all(heads_contiguous(t) for t in (query, key, value)) and query.shape[2] % 8 == 0
                and group <= self.kernels.max_group and k_cache.is_contiguous()
                and meta.block_tables.dtype == torch.int32 and meta.block_tables.stride(1) == 1
                and meta.seq_lens.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64)

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
                softcap: float = 0.0) -> torch.Tensor:
        if not self._usable(query, key, value, k_cache, meta):
            return super().forward(query, key, value, k_cache, v_cache, meta, scale, window, softcap)
        self.kernels.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        t, h, d = query.shape
        out = empty(t, h, d)  # fp32 (checked above); a plan's shared buffer while one is recorded
        nd = meta.num_decodes
        if nd:
            self.kernels.paged_decode_attention(query[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                                meta.seq_lens[:nd], scale, out[:nd], window, softcap)
        if nd == meta.num_requests:
            return out
        qsl = meta.query_start_loc_host[nd:]
        base = qsl[0]
        out[base:] = torch_ref.paged_prefill_attention(
            query[base:], k_cache, v_cache, meta.block_tables[nd:], [x - base for x in qsl],
            meta.seq_lens_host[nd:], scale, key=key[base:], value=value[base:], window=window, softcap=softcap,
        )
        return out
