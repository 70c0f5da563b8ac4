"""Kernel plans: a forward pass of C kernels recorded once, then replayed by one C call.

The CPU counterpart of a CUDA graph. While :func:`recording` is active, every C kernel call made
through engine/kernels/cpu (and the int8 kernels) also appends its function address and its
arguments (pointers, sizes) to a :class:`KernelPlan`; the plan keeps the tensors whose memory the
arguments point into. ``replay()`` hands the whole list to ``f32_run_plan``, which calls the kernels
in order: no Python, no torch dispatch, no ctypes conversion per kernel in between.

A plan is only correct if *every* computation of the recorded pass was a recorded kernel (a torch
op in between would not be replayed) and if the inputs live at the recorded addresses; the runner
that uses plans (engine/worker/cpu_graph.py) checks the first by comparing a replay with an eager
pass on fresh inputs before it trusts a plan.
"""
from __future__ import annotations

import ctypes
import struct
from contextlib import contextmanager
from typing import Iterator

import torch

_ACTIVE: "KernelPlan | None" = None


def f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def function_address(fn) -> int:
    """The address of a ctypes function (for a plan entry)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class PlanArena:
    """Output buffers shared by the plans of every batch size.

    The k-th output a recorded pass allocates is the same tensor, for the same layer, whatever the
    batch size: [rows, ...] with the same trailing shape. The arena keeps one ``[max_rows, ...]``
    buffer per k and hands out its first ``rows`` rows, so all plans together hold one set of
    activations instead of one per bucket (plans run one at a time, and a step's outputs are read
    before the next replay)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._slots: list[torch.Tensor] = []

    def take(self, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        rows, rest = shape[0], tuple(shape[1:])
        if k == len(self._slots):  # outputs are numbered from 0 in every pass: k never skips ahead
            self._slots.append(torch.empty((self.max_rows, *rest), dtype=dtype))
        slot = self._slots[k]
        if tuple(slot.shape[1:]) != rest or slot.dtype != dtype or rows > self.max_rows:
            return torch.empty(shape, dtype=dtype)  # another pass shape: not shared (its check decides)
        return slot[:rows]


class KernelPlan:
    """An ordered list of kernel calls with their packed arguments."""

    def __init__(self, run_plan, arena: PlanArena | None = None) -> None:
        self._run_plan = run_plan  # the f32_run_plan entry point of fp32_cpu.c
        self._arena = arena
        self._allocated = 0
        self._fns: list[int] = []
        self._offsets: list[int] = []
        self._args: list[int] = []
        self._names: list[str] = []
        self._keep: list[torch.Tensor] = []
        self._packed: tuple | None = None
        self.timings_ns: torch.Tensor | None = None  # per call, accumulated while profiling

    def __len__(self) -> int:
        return len(self._fns)

    def record(self, name: str, fn_address: int, args: tuple[int, ...], *keep: torch.Tensor) -> None:
        self._names.append(name)
        self._fns.append(fn_address)
        self._offsets.append(len(self._args))
        self._args.extend(int(a) for a in args)
        self._keep.extend(keep)
        self._packed = None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An output buffer for a kernel being recorded: from the arena when the plan has one."""
        if self._arena is None:
            return torch.empty(shape, dtype=dtype)
        self._allocated += 1
        return self._arena.take(self._allocated - 1, shape, dtype)

    def keep(self, *tensors: torch.Tensor) -> None:
        """Holds tensors the recorded pointers refer to (outputs, inputs written before a replay)."""
        self._keep.extend(tensors)

    def replay(self) -> None:
        if self._packed is None:
            t = lambda v: torch.tensor(v if v else [0], dtype=torch.int64)  # noqa: E731
            self._packed = (t(self._fns), t(self._offsets), t(self._args))
        fns, offsets, args = self._packed
        ns = 0 if self.timings_ns is None else self.timings_ns.data_ptr()
        self._run_plan(len(self._fns), fns.data_ptr(), offsets.data_ptr(), args.data_ptr(), ns)

    def profile(self, on: bool = True) -> None:
        """Starts (or stops) timing every call of later replays into ``timings_ns``."""
        self.timings_ns = torch.zeros(len(self._fns), dtype=torch.int64) if on else None

    def time_by_kernel(self) -> dict[str, float]:
        """Seconds spent in each kernel (by name) over the replays since :meth:`profile`."""
        out: dict[str, float] = {}
        if self.timings_ns is not None:
            for name, ns in zip(self._names, self.timings_ns.tolist()):
                out[name] = out.get(name, 0.0) + ns / 1e9
        return out


def active_plan() -> KernelPlan | None:
    return _ACTIVE


@contextmanager
def recording(plan: KernelPlan) -> Iterator[KernelPlan]:
    """Records every kernel call made inside the block into ``plan`` (the calls still run)."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a kernel plan is being recorded already")
    _ACTIVE = plan
    try:
        yield plan
    finally:
        _ACTIVE = None


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty`` for kernel outputs: while a plan is recorded, its (shared) buffer instead."""
    plan = _ACTIVE
    return torch.empty(shape, dtype=dtype) if plan is None else plan.empty(shape, dtype)
