"""Triton matmul of activations with GGUF weight blocks, dequantized in registers: Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 and the k-quants Q4_K, Q5_K, Q6_K.

``y[m, n] = sum_k x[m, k] * w[n, k]`` where row n of ``w`` is its GGUF blocks (uint8, the file's
layout, engine/layers/quantization/gguf_blocks.py). Each program computes a [BLOCK_M, BLOCK_N] tile
of y, walking K one tile of ``BLOCK_K`` values at a time: every value gathers its block's scale
bytes and its quant bits, the fp32 weight is rebuilt exactly as gguf_blocks.dequantize does (the
scale products are exact in fp32; an offset is added once), and ``tl.dot`` accumulates in fp32. The weights are read once
per M tile, 4.5 to 8.5 bits per value instead of 16 or 32: decode (M of 1..64 rows) is
memory-bound, so this is what makes a GGUF model's decode step on a GPU cheaper than fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import patch_interpreter
from engine.layers.quantization.gguf_blocks import (
    BLOCK_BYTES, FORMATS, KERNEL_TYPES, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, block_values, row_bytes,
)

patch_interpreter()


@triton.jit
def _load_half(ptr, offs, mask):
    """Little-endian fp16 at byte offsets ``offs`` -> fp32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _dequant(w_ptr, row_base, kk, wmask, QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """The fp32 weights at columns ``kk`` of the rows starting at byte ``row_base`` ([BLOCK_N, 1]):
    each value gathers its own scale and quant bytes, so one K tile may span blocks."""
    if QTYPE >= 12:  # k-quants: 256-value super-blocks of eight 32-value sub-blocks
        block = row_base + ((kk // 256) * BLOCK_BYTES)[None, :]
        pos = (kk % 256)[None, :]
        j = pos // 32  # sub-block
        i = pos % 32
        if QTYPE == 14:  # Q6_K: value 128 h + 32 s + i; (d * sc) * (q - 32), one int8 scale per 16 values
            h = j // 4
            sh = j % 4
            lo = (_byte(w_ptr, block + 64 * h + 32 * (sh % 2) + i, wmask) >> (4 * (sh // 2))) & 15
            hi = (_byte(w_ptr, block + 128 + 32 * h + i, wmask) >> (2 * sh)) & 3
            sc = tl.load(w_ptr + block + 192 + pos // 16, mask=wmask, other=0).to(tl.int8, bitcast=True)
            dsc = _load_half(w_ptr, block + 208, wmask) * sc.to(tl.float32)
            w = dsc * ((lo | (hi << 4)) - 32).to(tl.float32)
        else:  # Q4_K / Q5_K: (d * sc_j) * q - dmin * m_j, 6-bit sc_j and m_j packed in 12 bytes
            jl = j % 4
            b_lo = _byte(w_ptr, block + 4 + jl, wmask)
            b_mid = _byte(w_ptr, block + 8 + jl, wmask)
            b_hi = _byte(w_ptr, block + 12 + jl, wmask)
            sc = tl.where(j < 4, b_lo & 63, (b_hi & 15) | ((b_lo >> 6) << 4))
            mn = tl.where(j < 4, b_mid & 63, (b_hi >> 4) | ((b_mid >> 6) << 4))
            qs_at = 16 if QTYPE == 12 else 48
            q = (_byte(w_ptr, block + qs_at + 32 * (j // 2) + i, wmask) >> (4 * (j % 2))) & 15
            if QTYPE == 13:
                q = q | (((_byte(w_ptr, block + 16 + i, wmask) >> j) & 1) << 4)
            dsc = _load_half(w_ptr, block, wmask) * sc.to(tl.float32)
            dm = _load_half(w_ptr, block + 2, wmask) * mn.to(tl.float32)
            w = dsc * q.to(tl.float32) - dm  # an exact product: one rounding, fused or not
    else:
        block = row_base + ((kk // 32) * BLOCK_BYTES)[None, :]  # [BLOCK_N, BLOCK_K]: each value's block start
        within = (kk % 32)[None, :]
        d = _load_half(w_ptr, block, wmask)
        if QTYPE == 8:  # Q8_0: d, then 32 int8
            q8 = tl.load(w_ptr + block + 2 + within, mask=wmask, other=0).to(tl.int8, bitcast=True)
            w = d * q8.to(tl.float32)
        else:
            # byte j of the nibbles holds value j in its low nibble and value j + 16 in its high one
            qs_at = 2 if QTYPE == 2 else (4 if QTYPE == 3 else (6 if QTYPE == 6 else 8))
            q = (_byte(w_ptr, block + qs_at + within % 16, wmask) >> ((within // 16) * 4)) & 15
            if QTYPE == 6 or QTYPE == 7:  # Q5_0 / Q5_1: the fifth bit of value i is bit i of 4 bytes
                qh_at = 2 if QTYPE == 6 else 4
                q = q | (((_byte(w_ptr, block + qh_at + within // 8, wmask) >> (within % 8)) & 1) << 4)
            if QTYPE == 3 or QTYPE == 7:  # Q4_1 / Q5_1: d * q + m
                w = d * q.to(tl.float32) + _load_half(w_ptr, block + 2, wmask)
            elif QTYPE == 6:  # Q5_0: d * (q - 16)
                w = d * (q.to(tl.float32) - 16.0)
            else:  # Q4_0: d * (q - 8)
                w = d * (q.to(tl.float32) - 8.0)
    return w


@triton.jit
def _gguf_matmul_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, row_bytes,
    QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    row_base = rn.to(tl.int64)[:, None] * row_bytes  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        wmask = n_mask[:, None] & k_mask[None, :]
        w = _dequant(w_ptr, row_base, kk, wmask, QTYPE, BLOCK_BYTES)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + kk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


SUPPORTED = tuple(FORMATS)
HEAVY = (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)


def launch_config(m: int, type_id: int = Q8_0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): decode-sized M gets the smallest dot tile (16 rows)
    and wide N tiles, so the weight bytes (the cost) are read once per 16 rows. The 5-bit types and
    the k-quants gather more bytes per value: half the K tile keeps them in registers on sm_90."""
    if m <= 16:
        return 16, 64, 32 if type_id in HEAVY else 64, 4
    return 64, 64, 32, 8  # larger tiles spill registers on sm_90 (ptxas -v: the sm_90 compile test)


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, type_id: int, k: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(blocks).T (+ bias)`` for x [M, K] (any float dtype), blocks uint8 [N, row bytes]."""
    if type_id not in SUPPORTED:
        raise ValueError(f"GGUF type {type_id} has no Triton kernel; supported: {', '.join(KERNEL_TYPES.values())}")
    if k % block_values(type_id) or blocks.shape[1] != row_bytes(type_id, k) or x.shape[-1] != k:
        raise ValueError(f"GGUF blocks {tuple(blocks.shape)} do not hold rows of {k} values for type {type_id}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    blocks = blocks.contiguous()
    m, n = x2.shape[0], blocks.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, num_warps = launch_config(m, type_id)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_matmul_kernel[grid](
        x2, blocks, out, m, n, k, x2.stride(0), out.stride(0), blocks.shape[1],
        QTYPE=type_id, BLOCK_BYTES=BLOCK_BYTES[type_id], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)
