"""LoRA on the shared linear layers: each target layer's LinearMethod is wrapped by one that adds
the step's per-row adapter delta after the base matmul. The model files stay as they are.

Sharding follows the layer: a column-parallel layer (qkv, gate_up) keeps A whole and this rank's
rows of B (by heads for q/k/v, as QKVParallelLinear splits them); a row-parallel layer (o, down)
keeps this rank's columns of A and B whole, so its partial delta rides the layer's all-reduce.

The rows each adapter applies to travel in one :class:`LoRAContext` per step, installed by the
runner with :func:`lora_context` around the forward pass, as attention metadata travels.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear, QKVParallelLinear,
                                  RowParallelLinear, copy_heads)
from engine.kernels.cpu.ops import fp32_cpu_kernels
from engine.layers.quantization.base import LinearMethod
from engine.lora.adapter import TARGET_MODULES, LoRAWeights
from engine.lora.ops import LoRABatch, add_lora


@dataclass
class LoRAContext:
    """One step's adapter rows (engine/lora/ops.py's LoRABatch: slots, gather and scatter indices).
    ``row_slot`` ([rows] int32, -1: the base model) is what the fp32 CPU kernel reads; a kernel plan
    records its own static buffer here (``batch`` None) and refills it every replay."""

    batch: LoRABatch | None
    row_slot: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.row_slot is None and self.batch is not None:
            self.row_slot = self.batch.row_slot


_CURRENT: LoRAContext | None = None


@contextmanager
def lora_context(ctx: LoRAContext | None) -> Iterator[LoRAContext | None]:
    """Installs the step's adapter rows for the LoRA layers while the block runs (None: no row
    uses an adapter, the layers add nothing)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, ctx
    try:
        yield ctx
    finally:
        _CURRENT = previous


class LoRALinearMethod(LinearMethod):
    """The layer's own method plus the grouped delta. Slots are preallocated: ``lora_a`` [max_loras,
    n*max_rank, in], ``lora_b`` [max_loras, out, n*max_rank], block-diagonal over the n projections
    fused in the layer (q/k/v, gate/up); a smaller rank is zero-padded, a missing projection is zero."""

    def __init__(self, base: LinearMethod, layer: LinearBase, modules: list[str], max_loras: int,
                 max_rank: int) -> None:
        self.base = base
        self.name = base.name
        self.layer_ref = layer
        self.modules = modules  # PEFT names of the fused projections, in output order
        self.out_sizes = _local_out_sizes(layer, len(modules))
        self.max_rank = max_rank
        w = layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        n = len(modules)
        self.lora_a = torch.zeros(max_loras, n * max_rank, layer.in_features, dtype=dtype, device=w.device)
        self.lora_b = torch.zeros(max_loras, sum(self.out_sizes), n * max_rank, dtype=dtype, device=w.device)
        # fp32 on CPU: every slot's A and B also packed for the C kernel (fp32_gemm.c's f32_lora_add)
        self.kernels = fp32_cpu_kernels(self.lora_a)
        if self.kernels is not None and not self.kernels.has_gemm:
            self.kernels = None
        self.a_packed = self.b_packed = None
        if self.kernels is not None:
            self.a_packed = torch.stack([self.kernels.pack(self.lora_a[s]) for s in range(max_loras)])
            self.b_packed = torch.stack([self.kernels.pack(self.lora_b[s]) for s in range(max_loras)])

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self.base.apply(layer, x)
        ctx = _CURRENT
        if ctx is None:
            return out
        if self.kernels is not None and ctx.row_slot is not None and x.dtype == torch.float32 and x.stride(1) == 1:
            return self.kernels.lora_add(out, x, ctx.row_slot, self.a_packed, self.lora_a.shape[1], self.b_packed)
        if ctx.batch is not None:
            add_lora(out, x.to(self.lora_a.dtype), self.lora_a, self.lora_b, ctx.batch)
        return out

    def set_slot(self, slot: int, weights: list[LoRAWeights | None]) -> None:
        """Writes one adapter's matrices for this layer (one entry per fused projection) into ``slot``."""
        a, b = self.lora_a[slot], self.lora_b[slot]
        a.zero_()
        b.zero_()
        R, off = self.max_rank, 0
        for s, (w, size) in enumerate(zip(weights, self.out_sizes)):
            if w is not None:
                la, lb = shard_lora(self.layer_ref, s, w.a, w.b)
                r = la.shape[0]
                a[s * R : s * R + r].copy_(la)
                b[off : off + size, s * R : s * R + r].copy_(lb)
            off += size
        if self.kernels is not None:
            self.a_packed[slot].copy_(self.kernels.pack(a))
            self.b_packed[slot].copy_(self.kernels.pack(b))


def _local_out_sizes(layer: LinearBase, n: int) -> list[int]:
    if isinstance(layer, QKVParallelLinear):
        return [layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim,
                layer.num_kv_heads * layer.head_dim]
    if isinstance(layer, MergedColumnParallelLinear):
        return [s // layer.tp_size for s in layer.output_sizes]
    return [layer.out_features]


def shard_lora(layer: LinearBase, index: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of one projection's (A [r, in], B [out, r]), split like the layer's weight."""
    if isinstance(layer, QKVParallelLinear):
        heads = layer.layout.q_heads if index == 0 else layer.layout.kv_heads
        local = torch.empty(len(heads) * layer.head_dim, b.shape[1], dtype=b.dtype)
        copy_heads(local, b, 0, 0, heads, layer.head_dim)
        return a, local
    if isinstance(layer, MergedColumnParallelLinear):
        size = layer.output_sizes[index] // layer.tp_size
        return a, b.narrow(0, layer.tp_rank * size, size)
    if isinstance(layer, ColumnParallelLinear):
        return a, b.narrow(0, layer.tp_rank * layer.out_features, layer.out_features)
    if isinstance(layer, RowParallelLinear):
        if layer.input_heads is not None:
            local = torch.empty(a.shape[0], layer.in_features, dtype=a.dtype)
            copy_heads(local, a, 1, 0, layer.input_heads, layer.head_dim)
            return local, b
        return a.narrow(1, layer.tp_rank * layer.in_features, layer.in_features), b
    return a, b


_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[tuple[int, str], LoRALinearMethod]:
    """Wraps every target projection of ``model``; returns (layer index, engine layer name) -> method."""
    fused: dict[str, list[str]] = {}
    for peft_name, (ours, _) in TARGET_MODULES.items():
        fused.setdefault(ours, []).append(peft_name)
    out: dict[tuple[int, str], LoRALinearMethod] = {}
    for name, module in model.named_modules():
        m = _LAYER_NAME.search(name)
        if m is None or not isinstance(module, LinearBase) or m.group(2) not in fused:
            continue
        method = LoRALinearMethod(module.linear_method, module, fused[m.group(2)], max_loras, max_rank)
        module.linear_method = method
        out[(int(m.group(1)), m.group(2))] = method
    if not out:
        raise ValueError(f"enable_lora: {type(model).__name__} has no LoRA-capable projections "
                         f"({sorted(TARGET_MODULES)}); serve it without enable_lora")
    return out
