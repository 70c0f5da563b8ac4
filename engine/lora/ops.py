"""The LoRA delta of a mixed batch, grouped by adapter (punica's shrink / expand on CPU torch).

The step's adapter rows are gathered once into G groups of M rows (one group per slot in use,
padded to the largest group with repeats of a real row: ``perm``); one batched matmul shrinks every
group through its slot's A (``x @ A.T``: [G, M, n*r]), one expands through its B (``@ B.T``:
[G, M, out]); one gather (``inv``: a base-model row reads a zero row) puts the deltas back in row
order for the add. Each adapter's A and B are read once per layer per step however many rows use
it, and a layer costs the same handful of calls whatever G is (each torch call on a shared
2-core CPU can wait milliseconds for its thread pool, so calls, not FLOPs, are the cost). A step
whose rows all use one adapter skips the gathers and runs the two small matmuls on the fp32 C
kernel. ``index_add_`` is avoided: on CPU it costs milliseconds per call where a gather costs
microseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels.cpu.ops import fp32_cpu_kernels

C_KERNEL_MAX_ROWS = 64  # the fp32 C matmul's range (engine/layers/quantization/base.py)


@dataclass
class LoRABatch:
    """Which rows use which slot. ``slots``: the G slots in use, ascending; ``perm`` (G * M row
    indices, None when one slot covers every row in order) gathers group g's rows into
    [g*M, (g+1)*M); ``inv[t]`` is row t's place in that layout, or G * M (a zero row) for a
    base-model row; ``first_slot``: slots[0] when the slots are consecutive (a view, no copy)."""

    slots: list[int]
    group_rows: int = 0  # M
    perm: torch.Tensor | None = None
    inv: torch.Tensor | None = None
    has_base_rows: bool = False
    slot_index: torch.Tensor | None = None  # the slots as a tensor, when they are not consecutive
    row_slot: torch.Tensor | None = None  # [rows] int32: each row's slot, -1 for the base model (the C path)

    @classmethod
    def build(cls, slot_of_row: list[int], device: torch.device) -> "LoRABatch | None":
        """From each token row's slot (-1: the base model); None when no row uses an adapter."""
        groups: dict[int, list[int]] = {}
        for t, s in enumerate(slot_of_row):
            if s >= 0:
                groups.setdefault(s, []).append(t)
        if not groups:
            return None
        slots = sorted(groups)
        row_slot = torch.tensor(slot_of_row, dtype=torch.int32, device=device)
        n_lora = sum(len(g) for g in groups.values())
        if len(slots) == 1 and n_lora == len(slot_of_row):
            return cls(slots, row_slot=row_slot)
        m = max(len(g) for g in groups.values())
        perm: list[int] = []
        inv = [len(slots) * m] * len(slot_of_row)
        for gi, s in enumerate(slots):
            rows = groups[s]
            for i, t in enumerate(rows):
                inv[t] = gi * m + i
            perm += rows + [rows[0]] * (m - len(rows))  # padding: computed, never read back
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(slots, m, torch.tensor(perm, dtype=torch.int64, device=device),
                   torch.tensor(inv, dtype=torch.int64, device=device), n_lora < len(slot_of_row),
                   None if consecutive else torch.tensor(slots, dtype=torch.int64, device=device), row_slot)


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a row-major w, through the fp32 C kernel where it applies."""
    kernels = fp32_cpu_kernels(x, w)
    if kernels is not None and x.shape[0] <= C_KERNEL_MAX_ROWS and x.stride(1) == 1 and w.is_contiguous():
        return kernels.linear(x, w, None)
    return F.linear(x, w)


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             batch: LoRABatch) -> torch.Tensor:
    """Adds ``(x[t] @ lora_a[s].T) @ lora_b[s].T`` into ``out[t]`` for every row t on slot s.
    ``lora_a`` is [slots, n*r, in] and ``lora_b`` [slots, out, n*r] (block-diagonal over the
    layer's n fused projections, scale folded in)."""
    if x.is_cuda:
        return add_lora_triton(out, x, lora_a, lora_b, batch)
    if batch.perm is None:
        slot = batch.slots[0]
        return out.add_(_mm(_mm(x, lora_a[slot]), lora_b[slot]))
    g, m = len(batch.slots), batch.group_rows
    if batch.slot_index is None:
        a, b = lora_a[batch.slots[0] : batch.slots[0] + g], lora_b[batch.slots[0] : batch.slots[0] + g]
    else:
        a, b = lora_a.index_select(0, batch.slot_index), lora_b.index_select(0, batch.slot_index)
    xs = x.index_select(0, batch.perm).view(g, m, x.shape[1])
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)).view(g * m, out.shape[1])
    if batch.has_base_rows:
        delta = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
    return out.add_(delta.index_select(0, batch.inv))


def add_lora_triton(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    batch: LoRABatch) -> torch.Tensor:
    """The GPU path: shrink and expand as Triton grouped matmuls (engine/kernels/moe_matmul.py, the
    MoE experts' kernel: tiles of each group's gathered rows against that group's matrix), one
    launch each for every adapter of the step. Runs on CPU tensors in Triton's interpreter (tests)."""
    from engine.kernels.moe_matmul import moe_matmul

    if batch.perm is None:
        slot, rows = batch.slots[0], x.shape[0]
        index = torch.arange(rows, dtype=torch.int64, device=x.device)
        h = moe_matmul(x, lora_a[slot : slot + 1], index, [rows])
        return out.add_(moe_matmul(h, lora_b[slot : slot + 1], index, [rows]))
    g, m = len(batch.slots), batch.group_rows
    if batch.slot_index is None:
        a, b = lora_a[batch.slots[0] : batch.slots[0] + g], lora_b[batch.slots[0] : batch.slots[0] + g]
    else:
        a, b = lora_a.index_select(0, batch.slot_index), lora_b.index_select(0, batch.slot_index)
    h = moe_matmul(x, a, batch.perm, [m] * g)  # [G*M, n*r], group-major
    delta = moe_matmul(h, b, torch.arange(g * m, dtype=torch.int64, device=x.device), [m] * g)
    if batch.has_base_rows:
        delta = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
    return out.add_(delta.index_select(0, batch.inv))


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot_of_row: list[int]) -> torch.Tensor:
    """Row-by-row delta (slot -1: none): the slow definition ``add_lora`` is tested against."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype)
    for i, s in enumerate(slot_of_row):
        if s >= 0:
            out[i] = b[s] @ (a[s] @ x[i])
    return out
