"""Linear-layer methods: full precision, or int8 (``quantization="int8"``)."""
from __future__ import annotations

from engine.layers.quantization.base import LinearMethod, UnquantizedLinearMethod
from engine.layers.quantization.int8 import Int8LinearMethod, int8_matmul, onednn_int8_matmul, quantize_rows

QUANTIZATION_METHODS: dict[str | None, type[LinearMethod]] = {
    None: UnquantizedLinearMethod,
    "int8": Int8LinearMethod,
}


def get_linear_method(quantization: str | None) -> LinearMethod:
    try:
        return QUANTIZATION_METHODS[quantization]()
    except KeyError:
        raise ValueError(
            f"quantization={quantization!r} is not supported; use one of {sorted(k for k in QUANTIZATION_METHODS if k)} or None"
        ) from None


__all__ = ["LinearMethod", "UnquantizedLinearMethod", "Int8LinearMethod", "get_linear_method", "int8_matmul", "onednn_int8_matmul", "quantize_rows"]
