"""Weight formats of the matmul layers: full precision, or int8 (``quantization="int8"``).

:func:`method_for` is the per-scheme policy: which layer gets which method."""
from __future__ import annotations

from torch import nn

from engine.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from engine.layers.quantization.int8 import Int8LinearMethod, Int8WeightOnlyMethod, int8_matmul, quantize_groups, quantize_rows

SUPPORTED = ("int8",)

# Linear layers int8 leaves in full precision, by name suffix (none: see docs/performance.md for
# what keeping the MLP down projections in fp32 would buy and cost).
INT8_FULL_PRECISION: tuple[str, ...] = ()


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in SUPPORTED:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {list(SUPPORTED)} or None")


def method_for(quantization: str | None, name: str, module: nn.Module) -> LinearMethod | None:
    """The method for module ``name`` under ``quantization``, or None to leave it as loaded."""
    from engine.layers.embedding import ParallelLMHead
    from engine.layers.linear import LinearBase

    check_quantization(quantization)
    if quantization is None:
        return None
    if isinstance(module, ParallelLMHead):
        return Int8WeightOnlyMethod()
    if isinstance(module, LinearBase) and not name.endswith(INT8_FULL_PRECISION):
        return Int8LinearMethod()
    return None


__all__ = [
    "LinearMethod", "UnquantizedLinearMethod", "Int8LinearMethod", "Int8WeightOnlyMethod", "check_quantization",
    "method_for", "int8_matmul", "quantize_groups", "quantize_rows",
]
