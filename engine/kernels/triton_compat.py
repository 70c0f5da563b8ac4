"""Small Triton helpers shared by the kernel modules (imported only by Triton code paths).

The interpreter fix: Triton 3.6's interpreter converts a loaded scalar to a Python int with
``int(ndarray_of_shape_[1])``, which NumPy >= 2.4 rejects, so ``for i in range(0, loaded_len, BLOCK)``
fails under ``TRITON_INTERPRET=1`` (triton-lang/triton#9171, fixed upstream by squeezing). Compiled
kernels want exactly that ``for`` form: a ``while`` loop lowers to ``scf.while``, which Triton's software
pipeliner does not touch, so the K/V loads of the next tile would not be prefetched on the GPU.
We apply the upstream one-line fix when the interpreter is active and the bug is present.
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


def patch_interpreter_scalar_index() -> None:
    """Idempotently makes the interpreter's ``tensor.__index__`` squeeze size-1 arrays."""
    global _PATCHED
    if _PATCHED or not interpreter_active() or not _numpy_rejects_size1_int():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
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
