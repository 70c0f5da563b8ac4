"""Small Triton helpers shared by the kernel modules (imported only by Triton code paths).

Two fixes that make Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) behave like the compiled kernel,
applied only when the interpreter is active:

1. Loop bounds. The interpreter converts a loaded scalar to a Python int with
``int(ndarray_of_shape_[1])``, which NumPy >= 2.4 rejects, so ``for i in range(0, loaded_len, BLOCK)``
fails under ``TRITON_INTERPRET=1`` (triton-lang/triton#9171, fixed upstream by squeezing). Compiled
kernels want exactly that ``for`` form: a ``while`` loop lowers to ``scf.while``, which Triton's software
pipeliner does not touch, so the K/V loads of the next tile would not be prefetched on the GPU.
We apply the upstream one-line fix when the bug is present.

2. fp32 -> bf16 rounding. ``x.to(tl.bfloat16)`` truncates the mantissa in the interpreter, while the GPU
rounds to nearest even (``cvt.rn.bf16.f32``), so interpreter bf16 outputs were up to one ulp off. We
route that cast through a round-to-nearest-even conversion.
"""
from __future__ import annotations

import os

import triton

_PATCHED = False


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _numpy_rejects_size1_int() -> bool:
    import numpy as np

    try:
        int(np.zeros((1,), dtype=np.int32))
    except TypeError:
        return True
    return False


def fp32_to_bf16_rtne(data):  # type: ignore[no-untyped-def]
    """fp32 ndarray -> bf16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    import numpy as np

    f = np.asarray(data, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)


def patch_interpreter() -> None:
    """Idempotently applies both interpreter fixes (a no-op for compiled kernels)."""
    global _PATCHED
    if _PATCHED or not interpreter_active():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    if _numpy_rejects_size1_int():
        original_patch = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, scope) -> None:  # type: ignore[no-untyped-def]
            original_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patch_lang_tensor

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_rtne(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    _PATCHED = True


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(*dtypes) -> str:  # type: ignore[no-untyped-def]
    """``tl.dot`` precision for fp32-converted operands.

    16-bit inputs are exact in tf32 (fp16 and bf16 have at most 10 mantissa bits), so tf32 tensor cores
    lose nothing on them; fp32 inputs need full ``ieee`` precision to match the fp32 reference.
    """
    import torch

    return "ieee" if any(dt == torch.float32 for dt in dtypes) else "tf32"
