"""Triton paged decode attention: one query token per request against its whole paged context.

Grid ``(B, KVH, num_splits)``. A program owns one (request, KV head, context partition): it loads each
K/V tile once and scores it against all the query heads that share the KV head (GQA; the group is padded
to at least 16 rows so ``tl.dot`` maps onto tensor cores, padded rows are masked). Softmax is online, in
fp32, in the log2 domain. With one split the program normalizes and writes the output; with several,
each writes its partial output and log-sum-exp, and ``_decode_reduce_kernel`` merges the partitions.
Splitting lets a few long requests still occupy every SM.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import dot_precision, next_pow2, patch_interpreter

patch_interpreter()

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256  # below this a partition costs more to merge than it saves
MAX_SPLITS = 32


@triton.jit
def softcap_log2(s, cap):
    """cap * tanh(s / cap) in the log2 domain; tanh(x) = 1 - 2 / (e^{2x} + 1) (inf-safe both ways)."""
    return (cap - 2.0 * cap / (tl.exp(2.0 * s / cap) + 1.0)) * 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e); the plain scale when SOFTCAP
    window,  # > 0: only the last `window` keys are attended (sliding-window layers)
    softcap,  # used when SOFTCAP: scores become softcap * tanh(scores / softcap)
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,  # part_out [B, H, S, D] fp32, D contiguous
    stride_lb, stride_lh,  # part_lse [B, H, S] fp32, S contiguous
    num_kv_heads, head_dim,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # first attended key
    # each request partitions its own (windowed) context into NUM_SPLITS tile-aligned ranges
    split_len = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b * stride_bt
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        valid = pos < hi
        blk = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N]
        if SOFTCAP:
            s = softcap_log2(s, softcap)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        # an empty partition (short request) reports lse = -inf and a zero output
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        o_base = b * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + o_base[:, None] + d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_ob, stride_oh,
    head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the partitions of one (request, head): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # partition 0 is never empty, so the max is finite
    o = tl.load(
        part_out_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=s_mask[:, None] & (d[None, :] < head_dim), other=0.0,
    )
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N context tokens per tile, independent of the cache block size; num_warps).

    Chosen without a GPU from ptxas register reports for sm_90 (the sm_90 compile test checks that these
    configurations do not spill): with fp32-converted tiles, BLOCK_N=64 at 4 warps spills for head dim 128,
    8 warps with 32-token tiles (dim 128) or 64-token tiles (dim <= 64) do not. Tune on a GPU.
    """
    return (32, 8) if head_dim > 64 else (64, 8)


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough partitions that ``batch * num_kv_heads * splits`` covers the SMs about twice, never so many
    that a partition holds fewer than ``MIN_TOKENS_PER_SPLIT`` tokens. 1 off-GPU (the interpreter pays
    per program, not per thread)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(batch * num_kv_heads, 1))
    cap = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one query token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32 (includes the query token, whose K/V is already in cache)
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of one token per request over its whole paged context (its last ``window`` keys when
    ``window`` > 0; scores soft-capped when ``softcap`` > 0). Returns [B, H, D].

    ``max_seq_len`` (host int) only sizes the split heuristic; pass it to avoid a device sync.
    ``num_splits`` forces the context partition count (1 = single pass, no reduce kernel).
    ``out`` may be a preallocated ``[B, H, D]`` tensor (e.g. a slice of the step's output).
    """
    b, h, d = query.shape
    _, block_size, kvh, _ = k_cache.shape
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    for x in (query, k_cache, v_cache):
        if x.stride(-1) != 1:
            raise ValueError("paged_decode_attention needs the head dim contiguous")
    if out is None:
        out = torch.empty_like(query)
    if b == 0:
        return out
    group = h // kvh
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = default_num_splits(b, kvh, max_seq_len, query.device)
    num_splits = max(1, int(num_splits))
    block_d = next_pow2(d)
    block_n, num_warps = launch_config(d)
    if num_splits > 1:
        part_out = torch.empty((b, h, num_splits, d), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((b, h, num_splits), dtype=torch.float32, device=query.device)
    else:  # never touched by the single-pass kernel
        part_out = part_lse = out
    _decode_kernel[(b, kvh, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        out, part_out, part_lse,
        scale if softcap > 0 else scale * LOG2E, int(window), float(softcap),
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if num_splits > 1 else 0,
        part_lse.stride(0), part_lse.stride(1),
        kvh, d,
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, PRECISION=dot_precision(query.dtype, k_cache.dtype), SOFTCAP=softcap > 0,
        num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(b, h)](
            part_out, part_lse, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            d,
            NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
        )
    return out
