"""Triton KV write: stores the step's new K and V into the paged cache by slot mapping."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import next_pow2, patch_interpreter

patch_interpreter()


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_vcb, stride_vcs, stride_vch,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: copies its [KVH, D] key and value rows (last dim contiguous)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # slot -1 marks a padded token: every load and store of it is masked off
    mask = (slot >= 0) & (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_cb + offset * stride_cs + h[:, None] * stride_ch + d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
) -> None:
    """Stores the new tokens' K/V at their slots; slots of -1 (padding) are skipped."""
    t = key.shape[0]
    if t == 0:
        return
    _, block_size, kvh, d = k_cache.shape
    for x in (key, value, k_cache, v_cache):
        if x.stride(-1) != 1:
            raise ValueError("write_kv needs the head dim contiguous")
    _kv_write_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kvh, d,
        BLOCK_SIZE=block_size, BLOCK_H=next_pow2(kvh), BLOCK_D=next_pow2(d),
    )
