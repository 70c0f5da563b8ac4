"""Triton grouped matmul for mixture-of-experts: every (token, choice) pair times its expert's weight.

The pairs arrive sorted by expert (engine/layers/fused_moe.py). Each expert's run of pairs is cut
into tiles of ``BLOCK_M`` rows; program (t, j) multiplies tile t's rows (gathered from ``x`` through
``row_index``: the token of each pair, or the pair itself for the second projection) by columns
[j * BLOCK_N, ...) of its expert's weight ``w[e]`` ([E, N, K], rows of the output features), and
writes those rows of ``out`` in pair order. One launch covers every expert, and an expert's weight
is read once per tile of its pairs: at decode batch 1 only the chosen experts' weights are read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import patch_interpreter

patch_interpreter()


@triton.jit
def _moe_matmul_kernel(
    x_ptr, w_ptr, out_ptr, row_index_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr,
    N, K, stride_x, stride_we, stride_wn, stride_o,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    rows = tl.load(tile_rows_ptr + tile)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < rows
    pair = start + rm  # output rows, in pair order
    src = tl.load(row_index_ptr + pair, mask=m_mask, other=0).to(tl.int64)  # input row of each pair
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        xt = tl.load(x_ptr + src[:, None] * stride_x + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_base + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(wt), input_precision=PRECISION)
    dst = out_ptr + pair.to(tl.int64)[:, None] * stride_o + rn[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def launch_config(fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); 16 rows is the smallest tile tl.dot takes, and
    decode steps give each expert only a few pairs."""
    return (16, 64, 32, 4) if fp32 else (16, 128, 64, 4)


def expert_tiles(counts: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(expert, first pair, rows) of every tile: each expert's run of pairs cut into block_m rows."""
    experts, starts, rows = [], [], []
    start = 0
    for e, count in enumerate(counts):
        for off in range(0, count, block_m):
            experts.append(e)
            starts.append(start + off)
            rows.append(min(block_m, count - off))
        start += count
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(experts), as_t(starts), as_t(rows)


def moe_matmul(x: torch.Tensor, w: torch.Tensor, row_index: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """out[p] = x[row_index[p]] @ w[e(p)].T for pairs p sorted by expert, ``counts[e]`` pairs of
    expert e; x [T, K], w [E, N, K] -> out [P, N] in x's dtype."""
    num_pairs = int(row_index.shape[0])
    if sum(counts) != num_pairs or len(counts) != w.shape[0] or x.shape[-1] != w.shape[-1]:
        raise ValueError(f"moe_matmul: {num_pairs} pairs, counts summing to {sum(counts)} over {len(counts)} "
                         f"experts, x {tuple(x.shape)}, w {tuple(w.shape)} do not agree")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    n, k = w.shape[1], w.shape[2]
    out = torch.empty((num_pairs, n), dtype=x.dtype, device=x.device)
    if num_pairs == 0:
        return out
    fp32 = x.dtype == torch.float32
    block_m, block_n, block_k, num_warps = launch_config(fp32)
    experts, starts, rows = expert_tiles(counts, block_m, x.device)
    grid = (experts.shape[0], triton.cdiv(n, block_n))
    _moe_matmul_kernel[grid](
        x, w, out, row_index.to(torch.int32).contiguous(), experts, starts, rows,
        n, k, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        PRECISION="ieee" if fp32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
