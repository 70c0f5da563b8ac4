"""The small-batch CPU int8 kernels (int8_cpu.c), compiled at first use and called through ctypes.

Why a C kernel: at decode batch sizes a linear layer is a few tens of microseconds of memory
traffic, and torch's int8 paths spend more than that on dispatch (quantizing a row alone is ~7 ops,
~17 us; oneDNN's int8 linear costs ~50 us per call at batch 1; per-group scales would need one
``torch._int_mm`` per group). One ctypes call that quantizes, multiplies and scales costs a few
microseconds. It is built with the system C compiler (gcc/cc,
``-march=native``, about a second) into a per-machine cache; without a compiler the int8 layers
fall back to torch ops (same numbers for W8A8, slower). ``ENGINE_INT8_CPU_KERNELS=0`` disables it.
On CPUs with AMX, W8A8 batches run on AMX tiles (same bits); ``ENGINE_INT8_AMX=0`` keeps them on VNNI.
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.kernels.cpu.build import build as build_source
from engine.kernels.cpu.plan import active_plan, function_address
from engine.kernels.cpu.plan import empty as plan_empty

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_cpu.c")

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


def build(march: str = "native", out_dir: Path | None = None) -> Path:
    """Compiles int8_cpu.c for ``-march=march`` (cached by source, flags and CPU); returns the .so path."""
    return build_source(SOURCE, march, out_dir)


@dataclass
class PackedInt8:
    """A W8A8 weight in the kernel's layout (see :meth:`CpuInt8Kernels.pack`)."""

    packed: torch.Tensor  # int8 [Np/16, K4, 16, 4] (W8A8) or [Np/16, K, 16] (weight-only)
    comp: torch.Tensor | None  # int32 [groups, Np], W8A8 on VNNI builds
    scale: torch.Tensor  # fp32 [Np]
    bias: torch.Tensor | None  # fp32 [Np]
    n: int
    k: int
    group: int

    def nbytes(self) -> int:
        ts = [self.packed, self.comp, self.scale, self.bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class CpuInt8Kernels:
    """Typed entry points of one compiled build of int8_cpu.c."""

    def __init__(self, path: Path) -> None:
        # libgomp is loaded by torch already under the same soname: the kernels share its thread pool
        lib = ctypes.CDLL(str(path))
        lib.q8_isa.restype = ctypes.c_char_p
        lib.q8_needs_comp.restype = ctypes.c_int
        lib.q8_padded_n.restype = ctypes.c_int64
        lib.q8_padded_n.argtypes = [_i64]
        lib.q8_quantize.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _i64, _p]
        lib.q8_w8a8.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _i64, _i64]
        self._w8a8_address = function_address(lib.q8_w8a8_a)
        lib.q8_w8_padded_n.restype = ctypes.c_int64
        lib.q8_w8_padded_n.argtypes = [_i64]
        lib.q8_w8.argtypes = [_p, _i64, _i64, _i64, _p, _p, _p, _p, _i64, _i64]
        lib.q8_uses_amx.restype = ctypes.c_int
        lib.q8_amx_min_rows.restype = ctypes.c_int64
        lib.q8_set_amx.argtypes = [ctypes.c_int]
        self.lib, self.path = lib, path
        self.isa: str = lib.q8_isa().decode()
        self.needs_comp: bool = bool(lib.q8_needs_comp())
        if os.environ.get("ENGINE_INT8_AMX", "1") == "0":
            lib.q8_set_amx(0)

    @property
    def uses_amx(self) -> bool:
        """Whether W8A8 batches of :attr:`amx_min_rows` rows or more run on AMX tiles (an AMX build
        on a CPU and kernel that grant the tile state; ``ENGINE_INT8_AMX=0`` turns it off)."""
        return bool(self.lib.q8_uses_amx())

    @property
    def amx_min_rows(self) -> int:
        return int(self.lib.q8_amx_min_rows())

    def set_amx(self, on: bool) -> None:
        """Turns the AMX path on or off in this build (same bits either way; for tests and benchmarks)."""
        self.lib.q8_set_amx(int(on))

    def quantize(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8 of a 2-D fp32 tensor per row and group of ``group`` columns:
        (q int8 [M, K], scale fp32 [M, ceil(K / group)])."""
        x = _rows(x)
        m, k = x.shape
        q = torch.empty(m, k, dtype=torch.int8)
        scale = torch.empty(m, -(-k // group), dtype=torch.float32)
        self.lib.q8_quantize(x.data_ptr(), m, k, x.stride(0), group, q.data_ptr(), k, scale.data_ptr())
        return q, scale

    def pack(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, group: int) -> PackedInt8:
        """Lays out an int8 [N, K] weight for :meth:`w8a8`: ``[Np/16][K/4][16][4]`` (4 consecutive
        k of 16 output channels per 64-byte vector), N padded to ``q8_padded_n``, K to 4."""
        n, k = w_q.shape
        np_, k4 = int(self.lib.q8_padded_n(n)), -(-k // 4)
        wp = F.pad(w_q, (0, 4 * k4 - k, 0, np_ - n))
        comp = None
        if self.needs_comp:  # 128 * the sum of each group of each row, [groups][Np]
            ng = -(-k // group)
            sums = F.pad(wp, (0, ng * group - 4 * k4)).view(np_, ng, group).sum(-1, dtype=torch.int32)
            comp = (sums * 128).t().contiguous()
        packed = wp.view(np_ // 16, 16, k4, 4).permute(0, 2, 1, 3).contiguous()
        pad = lambda t: F.pad(t.float(), (0, np_ - n))  # noqa: E731
        return PackedInt8(packed, comp, pad(w_scale), None if bias is None else pad(bias), n, k, group)

    def w8a8(self, x: torch.Tensor, w: PackedInt8) -> torch.Tensor:
        """x [M, K] fp32 -> [M, N] fp32: int8 activations per row and group, exact int32 products."""
        x = _rows(x)
        m = x.shape[0]
        y = plan_empty(m, w.n)
        args = (x.data_ptr(), m, w.k, x.stride(0), w.group, w.packed.data_ptr(),
                0 if w.comp is None else w.comp.data_ptr(), w.scale.data_ptr(),
                0 if w.bias is None else w.bias.data_ptr(), y.data_ptr(), w.n, w.n)
        self.lib.q8_w8a8(*args)
        plan = active_plan()
        if plan is not None:  # a decode step being recorded (engine/kernels/cpu/plan.py)
            plan.record("q8_w8a8", self._w8a8_address, args, x, y)
        return y

    def pack_w8(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> PackedInt8:
        """Lays out an int8 [N, K] weight for :meth:`w8`: ``[Np/16][K][16]`` (16 output channels
        per k), N padded to ``q8_w8_padded_n``. Row i of the weight is ``packed[i // 16, :, i % 16]``."""
        n, k = w_q.shape
        np_ = int(self.lib.q8_w8_padded_n(n))
        packed = F.pad(w_q, (0, 0, 0, np_ - n)).view(np_ // 16, 16, k).transpose(1, 2).contiguous()
        pad = lambda t: F.pad(t.float(), (0, np_ - n))  # noqa: E731
        return PackedInt8(packed, None, pad(w_scale), None if bias is None else pad(bias), n, k, k)

    def w8(self, x: torch.Tensor, w: PackedInt8) -> torch.Tensor:
        """Weight-only: ``x @ (w * w_scale[:, None]).T (+ bias)`` with fp32 x [M, K]; -> [M, N] fp32."""
        x = _rows(x)
        m = x.shape[0]
        y = torch.empty(m, w.n, dtype=torch.float32)
        self.lib.q8_w8(x.data_ptr(), m, w.k, x.stride(0), w.packed.data_ptr(), w.scale.data_ptr(),
                       None if w.bias is None else w.bias.data_ptr(), y.data_ptr(), w.n, w.n)
        return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"the CPU int8 kernels take fp32 CPU activations, got {x.dtype} on {x.device}")
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    return x


@lru_cache(maxsize=None)
def load(march: str = "native") -> CpuInt8Kernels | None:
    """The kernels built for this machine, or None (no compiler, a build error, not x86/ARM Linux, or
    ENGINE_INT8_CPU_KERNELS=0), in which case callers use torch ops."""
    if os.environ.get("ENGINE_INT8_CPU_KERNELS", "1") == "0":
        return None
    try:
        kernels = CpuInt8Kernels(build(march))
    except (RuntimeError, OSError) as e:
        logger.warning("int8 CPU kernels unavailable (%s); int8 layers use torch ops", e)
        return None
    logger.info("int8 CPU kernels: %s build%s, %s", kernels.isa, " + AMX tiles" if kernels.uses_amx else "",
                kernels.path)
    return kernels
