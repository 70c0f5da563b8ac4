"""How a linear layer multiplies: the interfaces quantization methods and schemes implement.

Nothing here (or anywhere in this package) imports the layer modules: a layer says what it is
through its ``quant_kind`` class attribute, and a scheme picks a method from that."""
from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu.ops import fp32_cpu_kernels


class LinearMethod(ABC):
    """Owns a layer's weight format: converts it once after loading, then computes ``x @ W.T + b``."""

    name: str = "base"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once every checkpoint tensor is in place (this rank's shard, in the model dtype)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


class LayerKind(str, Enum):
    """What a matmul layer is, as far as quantization cares (a layer's ``quant_kind``)."""

    LINEAR = "linear"  # engine.layers.linear.LinearBase and its subclasses
    LM_HEAD = "lm_head"  # engine.layers.embedding.ParallelLMHead


class QuantizationScheme(ABC):
    """One ``quantization=`` value: which layer gets which :class:`LinearMethod`."""

    name: str = "base"

    @abstractmethod
    def method_for(self, kind: LayerKind, name: str) -> LinearMethod | None:
        """A fresh method for the layer called ``name`` of kind ``kind``, or None to leave it as loaded."""


# Without the packed GEMM (fp32_gemm.c), up to this many rows the row-major fp32 CPU kernel beats
# torch's GEMM (which wins on large batches); wide weights (an LM head) keep its advantage further.
CPU_KERNEL_MAX_ROWS = 64
CPU_KERNEL_MAX_ROWS_WIDE = 192
WIDE_OUT_FEATURES = 8192


class UnquantizedLinearMethod(LinearMethod):
    """fp32 on CPU: the packed GEMM at every batch size (the weight is packed into column panels
    at first use, a copy kept beside it and re-made if the weight is written); else the row-major
    kernel for small batches and torch's GEMM (docs/performance.md)."""

    name = "none"

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w, bias = layer.weight, getattr(layer, "bias", None)
        kernels = fp32_cpu_kernels(x, w)
        if kernels is not None and x.dim() == 2 and w.dim() == 2 and w.stride(1) == 1 and x.stride(1) == 1:
            if kernels.has_gemm:
                return kernels.gemm_packed(x, self._packed(layer, kernels, w), w.shape[0], bias)
            limit = CPU_KERNEL_MAX_ROWS_WIDE if w.shape[0] >= WIDE_OUT_FEATURES else CPU_KERNEL_MAX_ROWS
            if x.shape[0] <= limit:
                return kernels.linear(x, w, bias)
        return F.linear(x, w, bias)

    @staticmethod
    def _packed(layer: nn.Module, kernels, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version, tuple(w.shape))  # an in-place write or a new tensor re-packs
        cached = getattr(layer, "_packed_weight", None)
        if cached is None or cached[0] != key:
            cached = (key, kernels.pack(w))
            layer._packed_weight = cached
        return cached[1]
