"""Weight formats of the matmul layers: full precision, or int8 (``quantization="int8"``).

:data:`QUANTIZATION_SCHEMES` is the one registry of ``quantization=`` values (``EngineArgs``
validates against it); :func:`method_for` asks the chosen scheme which method a layer gets. The
package never imports the layer modules (they import it): a layer names its kind in ``quant_kind``."""
from __future__ import annotations

from torch import nn

from engine.layers.quantization.base import LayerKind, LinearMethod, QuantizationScheme, UnquantizedLinearMethod
from engine.layers.quantization.gguf import GGUFLinearMethod, GGUFScheme
from engine.layers.quantization.int8 import (
    INT8_FULL_PRECISION, Int8LinearMethod, Int8Scheme, Int8WeightOnlyMethod, int8_matmul, quantize_groups,
    quantize_rows,
)

QUANTIZATION_SCHEMES: dict[str, type[QuantizationScheme]] = {
    Int8Scheme.name: Int8Scheme,
    GGUFScheme.name: GGUFScheme,  # GGUF blocks kept as they are (engine/layers/quantization/gguf.py)
}
SUPPORTED = tuple(QUANTIZATION_SCHEMES)


def quantization_methods() -> list[str]:
    """The registered ``quantization=`` names, in registration order."""
    return list(QUANTIZATION_SCHEMES)


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {quantization_methods()} or None")


def get_scheme(quantization: str) -> QuantizationScheme:
    check_quantization(quantization)
    return QUANTIZATION_SCHEMES[quantization]()


def method_for(quantization: str | None, name: str, module: nn.Module) -> LinearMethod | None:
    """The method for module ``name`` under ``quantization``, or None to leave it as loaded."""
    check_quantization(quantization)
    if quantization is None:
        return None
    kind = getattr(type(module), "quant_kind", None)
    return None if kind is None else get_scheme(quantization).method_for(kind, name)


__all__ = [
    "LayerKind", "LinearMethod", "QuantizationScheme", "UnquantizedLinearMethod", "Int8LinearMethod",
    "Int8Scheme", "Int8WeightOnlyMethod", "GGUFLinearMethod", "GGUFScheme", "INT8_FULL_PRECISION", "QUANTIZATION_SCHEMES", "SUPPORTED",
    "check_quantization", "get_scheme", "method_for", "quantization_methods", "int8_matmul", "quantize_groups",
    "quantize_rows",
]
