"""Triton fused RMSNorm, optionally adding the residual first (one read of x and residual)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.triton_compat import next_pow2, patch_interpreter

patch_interpreter()


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row. Rounds where the reference rounds: x + residual and the normalized row are
    cast to the input dtype before the next step, so 16-bit results match torch's, not just approximate."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def num_warps_for(block: int) -> int:
    """About 8 fp32 values per thread per operand: a whole row stays in registers up to hidden size 32K."""
    return min(16, max(1, block // 256))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as Llama defines it (computed in fp32). With ``residual``, first adds it to ``x`` and
    returns ``(normed, x + residual)``: the new residual stream.

    ``out`` / ``residual_out`` may be given (contiguous, x's shape); they may alias ``x`` / ``residual``
    for an in-place update, since each row is read completely before it is written."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    # the reference computes weight * normed.to(x.dtype): the result takes the promoted dtype
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=x.device)
    elif out.dtype != out_dtype or out.shape != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {tuple(shape)}")
    if residual is not None:
        if residual.dtype != x.dtype:
            raise ValueError("rms_norm needs x and residual of the same dtype")
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        if residual_out is None:
            residual_out = torch.empty(shape, dtype=x.dtype, device=x.device)
        elif residual_out.dtype != x.dtype or residual_out.shape != shape or not residual_out.is_contiguous():
            raise ValueError(f"residual_out must be a contiguous {x.dtype} tensor of shape {tuple(shape)}")
        res2 = residual_out.view(rows, n)
    else:
        r2 = res2 = x2  # never touched: HAS_RESIDUAL is off
    out2 = out.view(rows, n)
    if rows:
        block = next_pow2(n)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), out2, res2,
            x2.stride(0), r2.stride(0), out2.stride(0), res2.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps_for(block),
        )
    return out if residual is None else (out, residual_out)
