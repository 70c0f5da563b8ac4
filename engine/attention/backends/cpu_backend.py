"""The fp32 CPU attention backend: KV writes and decode attention in C (engine/kernels/cpu), prefills
through SDPA as in the torch backend.

The decode kernel reads each request's K/V straight from its blocks (no gather into a workspace)
and each KV head once for its whole GQA group of query heads: at 64 requests of 128-256 tokens of
context a layer's decode attention drops from ~4 ms to ~0.7 ms (docs/performance.md). An int8 cache
(engine/attention/kv_format.py) has its own write and decode kernels, chosen here once. Prefills
run a C kernel too (query tiles that share each chunk of keys, straight from the blocks, fp32 or
int8; 1.1-1.8x gather + SDPA at 128-2,048 tokens); a head_dim over its limit uses gather + SDPA.
Any other dtype or layout falls back to the torch backend it extends.
"""
from __future__ import annotations

import torch

from engine.attention.backends.base import StepReplay
from engine.attention.backends.torch_backend import TorchAttentionBackend
from engine.attention.kv_format import KVCacheFormat
from engine.attention.metadata import AttentionMetadata
from engine.kernels import torch_ref
from engine.kernels.cpu.ops import CpuFp32Kernels, fp32_cpu_kernels, heads_contiguous
from engine.kernels.cpu.plan import empty


# the kernels (CpuFp32Kernels methods) that write and decode each cache format
KERNELS = {"auto": ("write_kv", "paged_decode_attention"), "int8": ("write_kv_int8", "paged_decode_attention_int8")}


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"
    step_replay = StepReplay.KERNEL_PLAN

    def __init__(self, kernels: CpuFp32Kernels, kv: KVCacheFormat | None = None) -> None:
        super().__init__(kv)
        self.kernels = kernels
        write, decode = KERNELS[self.kv.name]
        self._write_kv, self._decode_kernel = getattr(kernels, write), getattr(kernels, decode)
        self._max_head_dim = None if self.kv.exact else kernels.chunk_max_head_dim  # int8 decode dequantizes a chunk
        self._prefill_for: AttentionMetadata | None = None  # held, so its id cannot be reused
        self._prefill_starts: torch.Tensor | None = None  # the step's prefill spans, from 0 (int32)

    def _usable(self, query, key, value, k_cache, meta: AttentionMetadata) -> bool:
        if fp32_cpu_kernels(query, key, value) is None or k_cache.device.type != "cpu":
            return False
        d = query.shape[2]
        if k_cache.dtype != self.kv.cache_dtype or k_cache.shape[3] != self.kv.row_width(d):
            return False
        group = query.shape[1] // k_cache.shape[2]
        return (all(heads_contiguous(t) for t in (query, key, value)) and d % 8 == 0
                and (self._max_head_dim is None or d <= self._max_head_dim)
                and group <= self.kernels.max_group and k_cache.is_contiguous()
                and meta.block_tables.dtype == torch.int32 and meta.block_tables.stride(1) == 1
                and meta.seq_lens.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64)

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int = 0,
                softcap: float = 0.0) -> torch.Tensor:
        if not self._usable(query, key, value, k_cache, meta):
            return super().forward(query, key, value, k_cache, v_cache, meta, scale, window, softcap)
        self._write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        t, h, d = query.shape
        out = empty(t, h, d)  # fp32 (checked above); a plan's shared buffer while one is recorded
        nd = meta.num_decodes
        if nd:
            self._decode_kernel(query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                                out[:nd], window, softcap)
        if nd == meta.num_requests:
            return out
        qsl = meta.query_start_loc_host[nd:]
        base = qsl[0]
        if d <= self.kernels.chunk_max_head_dim:  # the prefill kernel lays out a chunk of keys per head
            if meta is not self._prefill_for:  # first layer of a step
                self._prefill_for = meta
                self._prefill_starts = torch.tensor([x - base for x in qsl], dtype=torch.int32)
            self.kernels.paged_prefill_attention(query[base:], k_cache, v_cache, meta.block_tables[nd:],
                                                 meta.seq_lens[nd:], self._prefill_starts, scale, out[base:], window,
                                                 softcap)
            return out
        out[base:] = torch_ref.paged_prefill_attention(
            query[base:], k_cache, v_cache, meta.block_tables[nd:], [x - base for x in qsl],
            meta.seq_lens_host[nd:], scale, key=self.kv.fresh(key[base:]), value=self.kv.fresh(value[base:]),
            window=window, softcap=softcap, load=self.kv.load,
        )
        return out
