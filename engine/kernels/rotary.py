"""Triton rotary embedding (rotate-half / GPT-NeoX / Hugging Face Llama layout), in place on q and k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import next_pow2, patch_interpreter

patch_interpreter()


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_heads, num_kv_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program per token: rotates all its query and key heads with one load of cos/sin."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    c_mask = c < half
    cos = tl.load(cos_sin_ptr + pos * stride_cs + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]

    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < num_heads) & c_mask[None, :]
    p1 = q_ptr + t * stride_qt + h[:, None] * stride_qh + c[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + half, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)

    kh = tl.arange(0, BLOCK_KH)
    kmask = (kh[:, None] < num_kv_heads) & c_mask[None, :]
    p1 = k_ptr + t * stride_kt + kh[:, None] * stride_kh + c[None, :]
    x1 = tl.load(p1, mask=kmask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=kmask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=kmask)
    tl.store(p1 + half, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=kmask)


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, KVH, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in the first D/2 columns, sin in the rest
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies rotary embedding in the rotate-half layout to query and key in place; returns them.

    q and k may be strided views (e.g. slices of a fused qkv projection) as long as the head dim is
    contiguous."""
    t, h, d = query.shape
    kvh = key.shape[1]
    half = cos_sin_cache.shape[1] // 2
    if 2 * half != d or key.shape[2] != d:
        raise ValueError(f"rotary over the full head dim only: cache width {cos_sin_cache.shape[1]}, head dim {d}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding needs the head dim contiguous")
    if t:
        _rotary_kernel[(t,)](
            positions, query, key, cos_sin_cache,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
            h, kvh, half,
            BLOCK_H=next_pow2(h), BLOCK_KH=next_pow2(kvh), BLOCK_HALF=next_pow2(half),
        )
    return query, key
