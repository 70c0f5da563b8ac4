"""GGUF weights kept quantized (``quantization="gguf"``): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
k-quants Q4_K, Q5_K, Q6_K, with fp32 activations.

The weights stay in the file's block layout (engine/layers/quantization/gguf_loader.py puts them on
the layers); nothing is re-quantized. A matmul rebuilds each weight value in registers with the bits
the gguf package's dequantization gives and sums the products in the order of the fp32 kernel, so
a GGUF layer's output equals the fp32 path on the dequantized checkpoint bit for bit wherever the
C kernel runs (up to 64 rows, 192 for an LM head; docs/performance.md). On GPU a Triton kernel
does the same in registers (engine/kernels/gguf_matmul.py). Past the C kernel's rows, or without
the C kernels, the weight is dequantized a slab at a time for torch's GEMM (the same weight
values; the summation order is torch's, as in the fp32 path).

``LLM("model.gguf")`` infers ``quantization="gguf"`` when every tensor of the file is of a type
listed here (or a float type) and its architecture is mapped; otherwise it logs why and loads the
file dequantized, as before. ``quantization="gguf"`` given explicitly never falls back: it names
the tensor and type it cannot run.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu import gguf_ops
from engine.kernels.cpu.plan import empty
from engine.layers.quantization.base import (
    CPU_KERNEL_MAX_ROWS, CPU_KERNEL_MAX_ROWS_WIDE, WIDE_OUT_FEATURES, LayerKind, LinearMethod, QuantizationScheme,
)
from engine.layers.quantization.gguf_blocks import dequantize

logger = logging.getLogger(__name__)

SLAB_ROWS = 4096  # weight rows dequantized at a time past the C kernel's range


def _kernels(x: torch.Tensor, type_id: int) -> "gguf_ops.CpuGgufKernels | None":
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    kernels = gguf_ops.load()
    return kernels if kernels is not None and kernels.supports(type_id) else None


@dataclass
class GGUFPart:
    """Output rows [start, stop) of a fused layer whose parts have different block types (a Q4_K_M
    file's q/k in Q4_K beside its v in Q6_K): ``blocks`` [stop - start, row bytes] of ``type_id``."""

    start: int
    stop: int
    type_id: int
    blocks: torch.Tensor


def _parts(layer: nn.Module) -> list[GGUFPart]:
    parts = getattr(layer, "gguf_parts", None)
    if parts is not None:
        return parts
    return [GGUFPart(0, layer.weight.shape[0], layer.gguf_type, layer.weight)]


def dequantized_weight(layer: nn.Module, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a GGUF layer's weight as fp32."""
    stop = sum(p.stop - p.start for p in _parts(layer)) if stop is None else stop
    out = []
    for part in _parts(layer):
        lo, hi = max(start, part.start), min(stop, part.stop)
        if lo >= hi:
            continue
        out.append(_dequant(part.blocks[lo - part.start:hi - part.start], part.type_id, layer.gguf_k))
    return out[0] if len(out) == 1 else torch.cat(out)


def _dequant(blocks: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
    """Blocks as fp32 [N, K]: the C kernel on CPU where it is built, else torch."""
    kernels = gguf_ops.load() if blocks.device.type == "cpu" else None
    return kernels.dequant(blocks, type_id, k) if kernels is not None else dequantize(blocks, type_id, k)


def gguf_linear(x2: torch.Tensor, blocks: torch.Tensor, type_id: int, k: int, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ dequant(blocks).T (+ bias)`` for x2 [M, K], written into ``out`` (a [M, N] view, any row
    stride) when given: the C kernel (up to its row limit), Triton on GPU, else dequantized slabs
    for torch's GEMM."""
    n = blocks.shape[0]
    limit = CPU_KERNEL_MAX_ROWS_WIDE if n >= WIDE_OUT_FEATURES else CPU_KERNEL_MAX_ROWS
    kernels = _kernels(x2, type_id)
    if kernels is not None and x2.shape[0] <= limit:
        return kernels.linear(x2, blocks, type_id, k, bias, out=out)
    if x2.is_cuda:  # Triton: the blocks dequantized in registers (engine/kernels/gguf_matmul.py)
        from engine.kernels.gguf_matmul import gguf_matmul

        y = gguf_matmul(x2, blocks, type_id, k, bias)
    else:  # a slab of weight rows dequantized at a time for torch's GEMM
        slabs = [F.linear(x2, _dequant(blocks[s:s + SLAB_ROWS], type_id, k).to(x2.dtype)) for s in range(0, n, SLAB_ROWS)]
        y = slabs[0] if len(slabs) == 1 else torch.cat(slabs, dim=-1)
        if bias is not None:
            y = y + bias.to(y.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


class GGUFLinearMethod(LinearMethod):
    """``x @ dequant(blocks).T (+ bias)`` for a layer whose ``weight`` holds GGUF blocks of one type."""

    name = "gguf"

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = gguf_linear(x2, layer.weight, layer.gguf_type, layer.gguf_k, getattr(layer, "bias", None))
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class GGUFPartsLinearMethod(LinearMethod):
    """A fused layer whose parts keep their own block types (``layer.gguf_parts``): each part's
    kernel writes its columns of one output, so nothing is dequantized or re-quantized."""

    name = "gguf"

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        parts = layer.gguf_parts
        bias = getattr(layer, "bias", None)
        y = empty(x2.shape[0], parts[-1].stop) if x2.device.type == "cpu" else torch.empty(
            x2.shape[0], parts[-1].stop, dtype=x2.dtype, device=x2.device)
        for p in parts:
            gguf_linear(x2, p.blocks, p.type_id, layer.gguf_k, None if bias is None else bias[p.start:p.stop],
                        out=y[:, p.start:p.stop])
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def gguf_rows(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows ``ids`` of a GGUF weight, as fp32 [*ids.shape, K]."""
    blocks = module.weight
    kernels = _kernels(torch.empty(0), module.gguf_type) if blocks.device.type == "cpu" else None
    if kernels is not None:
        return kernels.dequant_rows(blocks, module.gguf_type, module.gguf_k, ids)
    flat = ids.reshape(-1)
    return dequantize(blocks[flat], module.gguf_type, module.gguf_k).view(*ids.shape, module.gguf_k)


class GGUFScheme(QuantizationScheme):
    """``quantization="gguf"``: the loader (not this scheme) gives each layer its method, since the
    weights arrive quantized from the file; there is nothing to convert after loading."""

    name = "gguf"

    def method_for(self, kind: LayerKind, name: str) -> LinearMethod | None:
        return None


def _is_default(model) -> bool:
    from engine.models.default_model import DEFAULT_MODEL_NAME

    return model is None or str(model) in (DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}")


def resolve_gguf(model: str | os.PathLike | None, quantization: str | None) -> tuple[str | None, Path | None]:
    """(quantization, GGUF file to read the weights from) for an engine's ``model`` and
    ``quantization`` arguments: ``"gguf"`` explicitly (the default model's shipped GGUF, or a .gguf
    path), or inferred from a .gguf path whose tensors and architecture it can run."""
    from engine.models.default_model import find_default_gguf

    path = None
    if _is_default(model):
        path = find_default_gguf() if quantization == "gguf" else None
    elif Path(model).expanduser().suffix == ".gguf" and Path(model).expanduser().is_file():
        path = Path(model).expanduser()
    if quantization == "gguf":
        if path is None:
            raise ValueError(f"quantization='gguf' reads the weights of a .gguf file; {str(model)!r} is not one")
        return "gguf", path
    if quantization is not None or path is None:
        return quantization, None
    reason = unsupported_reason(path)
    if reason is not None:
        logger.info("%s loads dequantized (fp32): %s", path.name, reason)
        return None, None
    logger.info("%s: weights kept as GGUF blocks (quantization='gguf')", path.name)
    return "gguf", path


def unsupported_reason(path: Path) -> str | None:
    """Why quantization='gguf' cannot load ``path`` as it is, or None when it can."""
    from engine.layers.quantization.gguf_blocks import FLOAT_TYPES, KERNEL_TYPES, type_name
    from engine.layers.quantization.gguf_reader import GGUF_DIRECT_ARCHITECTURES
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the load reports it with the tensor's name
        return f"unreadable ({e})"
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    if arch not in GGUF_DIRECT_ARCHITECTURES:
        return f"architecture {arch!r} is not mapped for quantization='gguf'"
    other = sorted({type_name(int(t.tensor_type)) for t in reader.tensors
                    if int(t.tensor_type) not in KERNEL_TYPES and int(t.tensor_type) not in FLOAT_TYPES})
    return f"tensor types {other} have no GGUF kernel" if other else None
