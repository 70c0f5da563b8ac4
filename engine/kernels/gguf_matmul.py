"""Triton matmul of activations with GGUF weight blocks (Q4_0, Q4_1, Q8_0), dequantized in registers.

``y[m, n] = sum_k x[m, k] * w[n, k]`` where row n of ``w`` is its GGUF blocks (uint8, the file's
layout: per 32 values an fp16 ``d``, Q4_1's fp16 ``m``, then 16 bytes of nibbles or 32 int8).
Each program computes a [BLOCK_M, BLOCK_N] tile of y, walking K one tile of ``BLOCK_K`` values
(``BLOCK_K / 32`` GGUF blocks) at a time: it loads the tile's scale bytes and quants, rebuilds the
fp32 weights exactly as engine/layers/quantization/gguf_blocks.dequantize does (``d * q`` is
exact in fp32; Q4_1 adds ``m`` once), and accumulates ``tl.dot`` in fp32. The weights are read once
per M tile, 4.5 to 8.5 bits per value instead of 16 or 32: decode (M of 1..64 rows) is
memory-bound, so this is what makes a GGUF model's decode step on a GPU cheaper than fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import patch_interpreter
from engine.layers.quantization.gguf_blocks import BLOCK, BLOCK_BYTES, Q4_0, Q4_1, Q8_0, row_bytes

patch_interpreter()


@triton.jit
def _load_half(ptr, offs, mask):
    """Little-endian fp16 at byte offsets ``offs`` -> fp32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


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
    within = rk % 32  # position inside its GGUF block
    row_base = rn.to(tl.int64)[:, None] * row_bytes  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        wmask = n_mask[:, None] & k_mask[None, :]
        block = row_base + ((kk // 32) * BLOCK_BYTES)[None, :]  # [BLOCK_N, BLOCK_K]: each value's block start
        d = _load_half(w_ptr, block, wmask)
        if QTYPE == 8:  # Q8_0: d, then 32 int8
            q = tl.load(w_ptr + block + 2 + within[None, :], mask=wmask, other=0).to(tl.int8, bitcast=True)
            w = d * q.to(tl.float32)
        else:
            qs_at = 4 if QTYPE == 3 else 2
            # byte j of a block holds value j in its low nibble and value j + 16 in its high one
            byte = tl.load(w_ptr + block + qs_at + (within % 16)[None, :], mask=wmask, other=0)
            q = ((byte >> ((within // 16) * 4).to(tl.uint8)[None, :]) & 0xF).to(tl.float32)
            if QTYPE == 3:  # Q4_1: d * q + m
                w = d * q + _load_half(w_ptr, block + 2, wmask)
            else:  # Q4_0: d * (q - 8)
                w = d * (q - 8.0)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + kk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


SUPPORTED = (Q4_0, Q4_1, Q8_0)


def launch_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): decode-sized M gets the smallest dot tile (16 rows)
    and wide N tiles, so the weight bytes (the cost) are read once per 16 rows."""
    if m <= 16:
        return 16, 64, 64, 4
    return 64, 64, 32, 8  # larger tiles spill registers on sm_90 (ptxas -v: the sm_90 compile test)


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, type_id: int, k: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(blocks).T (+ bias)`` for x [M, K] (any float dtype), blocks uint8 [N, row bytes]."""
    if type_id not in SUPPORTED:
        raise ValueError(f"GGUF type {type_id} has no Triton kernel; supported: Q4_0, Q4_1, Q8_0")
    if k % BLOCK or blocks.shape[1] != row_bytes(type_id, k) or x.shape[-1] != k:
        raise ValueError(f"GGUF blocks {tuple(blocks.shape)} do not hold rows of {k} values for type {type_id}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    blocks = blocks.contiguous()
    m, n = x2.shape[0], blocks.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, num_warps = launch_config(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_matmul_kernel[grid](
        x2, blocks, out, m, n, k, x2.stride(0), out.stride(0), blocks.shape[1],
        QTYPE=type_id, BLOCK_BYTES=BLOCK_BYTES[type_id], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)
