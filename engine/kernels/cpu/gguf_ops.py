"""The GGUF block kernels of gguf_cpu.c through ctypes: fp32 activations times GGUF weight blocks
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q4_K, Q5_K, Q6_K, dequantized in registers),
whole-weight and row dequantization.

Built like the fp32 kernels (engine/kernels/cpu/build.py, ``-march=native``, cached per machine);
``ENGINE_GGUF_CPU_KERNELS=0`` or a failed build makes :func:`load` return None, and callers then
dequantize with torch (the same values: engine/layers/quantization/gguf_blocks.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from engine.kernels.cpu.build import build
from engine.kernels.cpu.plan import active_plan, empty, function_address

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_cpu.c")

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class CpuGgufKernels:
    """Typed entry points of one compiled build of gguf_cpu.c. ``linear`` is also recorded into the
    active kernel plan, if any (engine/kernels/cpu/plan.py)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # shares the libgomp thread pool torch has loaded
        lib.gq_isa.restype = ctypes.c_char_p
        lib.gq_block_bytes.restype = _i64
        lib.gq_block_bytes.argtypes = [_i64]
        lib.gq_linear.argtypes = [_p, _i64, _i64, _i64, _p, _i64, _i64, _i64, _p, _p, _i64]
        lib.gq_dequant.argtypes = [_p, _i64, _i64, _i64, _i64, _p]
        lib.gq_dequant_rows.argtypes = [_p, _i64, _p, _i64, _i64, _i64, _p]
        self._linear_address = function_address(lib.gq_linear_a)
        self.lib, self.path = lib, path
        self.isa: str = lib.gq_isa().decode()

    def supports(self, type_id: int) -> bool:
        return int(self.lib.gq_block_bytes(type_id)) > 0

    def linear(self, x: torch.Tensor, blocks: torch.Tensor, type_id: int, k: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ dequant(blocks).T (+ bias)``: x [M, K] fp32 (rows contiguous), blocks uint8 [N, row
        bytes] in the GGUF layout; -> [M, N] fp32, written into ``out`` when given (a view with
        contiguous rows: the columns of a wider output)."""
        m = x.shape[0]
        n = blocks.shape[0]
        y = empty(m, n) if out is None else out
        if y.shape != (m, n) or y.stride(-1) != 1 or y.dtype != torch.float32:
            raise ValueError(f"out must be a float32 [{m}, {n}] view with contiguous rows, not {tuple(y.shape)}")
        args = (x.data_ptr(), m, k, x.stride(0), blocks.data_ptr(), type_id, n, blocks.stride(0),
                0 if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
        self.lib.gq_linear(*args)
        plan = active_plan()
        if plan is not None:  # a decode step being recorded
            plan.record("gq_linear", self._linear_address, args, x, y, blocks)
        return y

    def dequant(self, blocks: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
        """All rows of a block weight as fp32 [N, K]."""
        n = blocks.shape[0]
        out = torch.empty(n, k, dtype=torch.float32)
        self.lib.gq_dequant(blocks.data_ptr(), type_id, n, k, blocks.stride(0), out.data_ptr())
        return out

    def dequant_rows(self, blocks: torch.Tensor, type_id: int, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64, any shape) of a block weight as fp32 [*ids.shape, K]."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.shape[0], k, dtype=torch.float32)
        self.lib.gq_dequant_rows(blocks.data_ptr(), type_id, flat.data_ptr(), flat.shape[0], k, blocks.stride(0),
                                 out.data_ptr())
        return out.view(*ids.shape, k)


@lru_cache(maxsize=None)
def load(march: str = "native") -> CpuGgufKernels | None:
    """The kernels built for this machine, or None (no compiler, a build error, or
    ``ENGINE_GGUF_CPU_KERNELS=0``)."""
    if os.environ.get("ENGINE_GGUF_CPU_KERNELS", "1") == "0":
        return None
    try:
        kernels = CpuGgufKernels(build(SOURCE, march))
    except (RuntimeError, OSError) as e:
        logger.warning("GGUF CPU kernels unavailable (%s); GGUF layers dequantize with torch", e)
        return None
    logger.info("GGUF CPU kernels: %s build, %s", kernels.isa, kernels.path)
    return kernels
