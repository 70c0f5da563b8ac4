"""The fp32 CPU kernels of fp32_cpu.c, through ctypes: matmuls for small batches, RMSNorm, SiLU-and-mul,
rotary embedding, KV-cache writes and paged decode attention (over fp32 or int8 caches).

Why C: at decode batch sizes most of a step's ops are a few microseconds of arithmetic behind
several torch dispatches each (about 2,000 per SmolLM2 step), and torch's GEMMs stream a batch-1
weight at 50-60% of the read bandwidth; one ctypes call costs a couple of microseconds. Callers
check :func:`load` (None: no compiler, a failed build, or ``ENGINE_CPU_KERNELS=0``) and use torch
otherwise. Every function takes fp32 CPU tensors; the callers choose when to call them.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from engine.kernels.cpu.build import build
from engine.kernels.cpu.plan import active_plan, empty, f32_bits, f64_bits, function_address

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fp32_cpu.c")
MODELS_SOURCE = Path(__file__).with_name("fp32_models.c")  # per-head RMSNorm, GeLU-and-mul
GEMM_SOURCE = Path(__file__).with_name("fp32_gemm.c")  # the packed-weight GEMM for every batch size

_p, _i64, _f32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double


class CpuFp32Kernels:
    """Typed entry points of one compiled build of fp32_cpu.c. Every call is also recorded into the
    active kernel plan, if any (engine/kernels/cpu/plan.py)."""

    def __init__(self, path: Path, models_path: Path | None = None, gemm_path: Path | None = None) -> None:
        lib = ctypes.CDLL(str(path))  # shares the libgomp thread pool torch has loaded
        lib.f32_isa.restype = ctypes.c_char_p
        lib.f32_max_group.restype = _i64
        lib.f32_chunk_max_head_dim.restype = _i64
        signatures = {
            "f32_linear": [_p, _i64, _i64, _i64, _p, _i64, _i64, _p, _p, _i64],
            "f32_rms_norm": [_p, _p, _p, _i64, _i64, _f64, _p],
            "f32_silu_and_mul": [_p, _i64, _i64, _p],
            "f32_rotary": [_p, _i64, _p, _i64, _p, _i64, _i64, _i64, _i64, _p],
            "f32_write_kv": [_p, _i64, _p, _i64, _p, _i64, _i64, _p, _p],
            "f32_paged_decode_attention": [_p, _i64, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _f32, _i64,
                                           _f32, _p],
            "i8_write_kv": [_p, _i64, _p, _i64, _p, _i64, _i64, _i64, _p, _p],
            "f32_paged_prefill_attention": [_p, _i64, _p, _p, _i64, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, _i64,
                                            _f32, _i64, _f32, _p],
            "i8_paged_decode_attention": [_p, _i64, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _f32, _i64,
                                          _f32, _p],
        }
        self._fn: dict[str, tuple] = {}
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            self._fn[name] = (fn, function_address(getattr(lib, name + "_a")))
        if models_path is not None:
            models = ctypes.CDLL(str(models_path))
            for name, argtypes in {"f32_rms_norm_heads": [_p, _i64, _i64, _i64, _i64, _p, _f64, _p],
                                   "f32_gelu_and_mul": [_p, _i64, _i64, _i64, _p]}.items():
                fn = getattr(models, name)
                fn.argtypes = argtypes
                self._fn[name] = (fn, function_address(getattr(models, name + "_a")))
        self.has_model_kernels = models_path is not None
        self.has_gemm = gemm_path is not None
        self.gemm_isa: str = "none"  # which GEMM tiles the build runs: avx512, avx2 or generic
        if gemm_path is not None:
            gemm = ctypes.CDLL(str(gemm_path))
            gemm.f32_gemm_pack.argtypes = [_p, _i64, _i64, _i64, _p]
            gemm.f32_gemm_panel_width.restype = _i64
            gemm.f32_gemm_isa.restype = ctypes.c_char_p
            self.gemm_isa = gemm.f32_gemm_isa().decode()
            self._pack, self.panel_width = gemm.f32_gemm_pack, int(gemm.f32_gemm_panel_width())
            gemm.f32_fma_peak.argtypes, gemm.f32_fma_peak.restype = [_i64, _p], _i64
            self._fma_peak = gemm.f32_fma_peak
            fn = gemm.f32_gemm_packed
            fn.argtypes = [_p, _i64, _i64, _i64, _p, _i64, _p, _p, _i64]
            self._fn["f32_gemm_packed"] = (fn, function_address(gemm.f32_gemm_packed_a))
            fn = gemm.f32_lora_add
            fn.argtypes = [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _p, _i64, _p, _p, _i64]
            self._fn["f32_lora_add"] = (fn, function_address(gemm.f32_lora_add_a))
        lib.f32_run_plan.argtypes = [_i64, _p, _p, _p, _p]
        self.run_plan = lib.f32_run_plan
        self.lib, self.path = lib, path
        self.isa: str = lib.f32_isa().decode()
        self.max_group = int(lib.f32_max_group())
        self.chunk_max_head_dim = int(lib.f32_chunk_max_head_dim())  # int8 decode and prefill kernels

    def _call(self, name: str, args: tuple, keep: tuple, plan_args: tuple | None = None) -> None:
        """Runs a kernel; while a plan is recorded, also records it with ``keep``, the tensors
        (other than weights and caches, which outlive plans) whose memory ``args`` point into."""
        fn, address = self._fn[name]
        fn(*args)
        plan = active_plan()
        if plan is not None:
            plan.record(name, address, args if plan_args is None else plan_args, *keep)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for x [M, K] (rows contiguous) and a row-major weight [N, K]."""
        m, k = x.shape
        n = weight.shape[0]
        y = empty(m, n)
        self._call("f32_linear", (x.data_ptr(), m, k, x.stride(0), weight.data_ptr(), n, weight.stride(0),
                                  0 if bias is None else bias.data_ptr(), y.data_ptr(), n), (x, y))
        return y

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A row-major weight [N, K] as the packed GEMM's column panels [ceil(N / 16), K, 16] (a copy)."""
        n, k = weight.shape
        w = self.panel_width
        packed = torch.empty((-(-n // w), k, w), dtype=torch.float32)
        self._pack(weight.data_ptr(), n, k, weight.stride(0), packed.data_ptr())  # not a step's kernel: never recorded
        return packed

    def fma_flops(self, iters: int) -> int:
        """Runs the FMA peak loop (``iters`` rounds of 12 vector FMAs per thread, registers only) on
        every thread; returns the FLOPs done. Timed, it is the build's fp32 peak rate."""
        sink = ctypes.c_float(0.0)
        return int(self._fma_peak(iters, ctypes.addressof(sink)))

    def gemm_packed(self, x: torch.Tensor, packed: torch.Tensor, n: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for x [M, K] (rows contiguous) and ``packed = pack(W)``, W [n, K]; any M.
        Each output is one FMA chain over k in order: a row's result never depends on the batch."""
        m, k = x.shape
        y = empty(m, n)
        self._call("f32_gemm_packed", (x.data_ptr(), m, k, x.stride(0), packed.data_ptr(), n,
                                       0 if bias is None else bias.data_ptr(), y.data_ptr(), n), (x, y))
        return y

    def lora_add(self, out: torch.Tensor, x: torch.Tensor, row_slot: torch.Tensor, a_packed: torch.Tensor,
                 rank: int, b_packed: torch.Tensor) -> torch.Tensor:
        """``out[m] += (x[m] @ A[s].T) @ B[s].T`` for every row m on slot ``s = row_slot[m] >= 0`` (int32),
        A[s] [rank, K] and B[s] [N, rank] packed by :meth:`pack` into ``a_packed[s]`` / ``b_packed[s]``."""
        m, k = x.shape
        n = out.shape[1]
        scratch = empty(m, k + rank + n)
        self._call("f32_lora_add", (x.data_ptr(), m, k, x.stride(0), row_slot.data_ptr(), a_packed.shape[0],
                                    a_packed.data_ptr(), rank, b_packed.data_ptr(), n, scratch.data_ptr(),
                                    out.data_ptr(), out.stride(0)), (x, row_slot, scratch, out))
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As ``torch_ref.rms_norm``; with ``residual`` the sum x + residual is written into
        ``residual`` in place and returned as the new residual stream."""
        m, h = x.shape
        out = empty(m, h)
        args = (x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), m, h, eps,
                out.data_ptr())
        keep = (x, out) if residual is None else (x, out, residual)
        self._call("f32_rms_norm", args, keep, args[:5] + (f64_bits(eps), args[6]))
        return out if residual is None else (out, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        m, two_i = x.shape
        out = empty(m, two_i // 2)
        self._call("f32_silu_and_mul", (x.data_ptr(), m, two_i // 2, out.data_ptr()), (x, out))
        return out

    def rms_norm_heads(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of every head of x [T, H, D] (heads contiguous, any token stride) -> [T, H, D]."""
        t, h, d = x.shape
        out = empty(t, h, d)
        args = (x.data_ptr(), x.stride(0), t, h, d, weight.data_ptr(), eps, out.data_ptr())
        self._call("f32_rms_norm_heads", args, (x, out), args[:6] + (f64_bits(eps), args[7]))
        return out

    def gelu_and_mul(self, x: torch.Tensor, tanh_approx: bool) -> torch.Tensor:
        m, two_i = x.shape
        out = empty(m, two_i // 2)
        self._call("f32_gelu_and_mul", (x.data_ptr(), m, two_i // 2, int(tanh_approx), out.data_ptr()), (x, out))
        return out

    def rotary_(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                cos_sin_cache: torch.Tensor) -> None:
        """Rotates query [T, H, D] and key [T, KVH, D] (heads contiguous) in place; positions int64."""
        t, h, d = query.shape
        self._call("f32_rotary", (query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0),
                                  positions.data_ptr(), t, h, key.shape[1], d, cos_sin_cache.data_ptr()),
                   (query, key, positions, cos_sin_cache))

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """key/value [T, KVH, D] (heads contiguous) to their int64 slots; -1 is skipped."""
        self._call("f32_write_kv", (key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
                                    slots.data_ptr(), key.shape[0], key.shape[1] * key.shape[2],
                                    k_cache.data_ptr(), v_cache.data_ptr()), (key, value, slots))

    def write_kv_int8(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor) -> None:
        """As :meth:`write_kv` into int8 caches [num_blocks, BS, KVH, D + 4]: each row quantized with
        its own scale, the bits of ``Int8KVFormat.store`` (engine/attention/kv_format.py)."""
        self._call("i8_write_kv", (key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
                                   slots.data_ptr(), key.shape[0], key.shape[1], key.shape[2],
                                   k_cache.data_ptr(), v_cache.data_ptr()), (key, value, slots))

    def paged_decode_attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               out: torch.Tensor, window: int = 0, softcap: float = 0.0) -> None:
        """One query token per request over its paged context, into ``out`` [B, H, D] (contiguous).
        block_tables [B, max_blocks] and seq_lens [B] are int32. ``window`` > 0: the last ``window``
        keys only; ``softcap`` > 0: scores capped to ``softcap * tanh(s / softcap)``. Both are the
        layer's constants, so a kernel plan records them as they are."""
        self._decode("f32_paged_decode_attention", query, k_cache, v_cache, block_tables, seq_lens, scale, out,
                     window, softcap)

    def paged_decode_attention_int8(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                    out: torch.Tensor, window: int = 0, softcap: float = 0.0) -> None:
        """As :meth:`paged_decode_attention` over int8 caches (head_dim <= ``chunk_max_head_dim``): the
        same bits as the fp32 kernel over the dequantized cache."""
        self._decode("i8_paged_decode_attention", query, k_cache, v_cache, block_tables, seq_lens, scale, out,
                     window, softcap)

    def paged_prefill_attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, out: torch.Tensor, window: int = 0, softcap: float = 0.0) -> None:
        """Causal attention of each request's query span over its paged context, into ``out`` [T, H, D]
        (contiguous); query_start_loc [B + 1] int32 from 0, block_tables [B, max_blocks] and seq_lens
        [B] int32; an fp32 or int8 cache; head_dim <= ``chunk_max_head_dim``. ``window`` and
        ``softcap`` as in :meth:`paged_decode_attention`."""
        t, h, d = query.shape
        _, bs, kvh, _ = k_cache.shape
        args = (query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                int(k_cache.dtype == torch.int8), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
                query_start_loc.data_ptr(), seq_lens.shape[0], h, kvh, d, bs, scale, int(window), float(softcap),
                out.data_ptr())
        self._call("f32_paged_prefill_attention", args, (query, block_tables, seq_lens, query_start_loc, out),
                   args[:14] + (f32_bits(scale), args[15], f32_bits(args[16]), args[17]))

    def _decode(self, name: str, query, k_cache, v_cache, block_tables, seq_lens, scale, out, window, softcap) -> None:
        b, h, d = query.shape
        _, bs, kvh, _ = k_cache.shape
        args = (query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                block_tables.stride(0), seq_lens.data_ptr(), b, h, kvh, d, bs, scale, int(window), float(softcap),
                out.data_ptr())
        self._call(name, args, (query, block_tables, seq_lens, out),
                   args[:12] + (f32_bits(scale), args[13], f32_bits(args[14]), args[15]))


@lru_cache(maxsize=None)
def load(march: str = "native") -> CpuFp32Kernels | None:
    """The kernels built for this machine, or None (no compiler, a build error, or
    ``ENGINE_CPU_KERNELS=0``), in which case callers use torch ops."""
    if os.environ.get("ENGINE_CPU_KERNELS", "1") == "0":
        return None
    try:
        kernels = CpuFp32Kernels(build(SOURCE, march), build(MODELS_SOURCE, march), build(GEMM_SOURCE, march))
    except (RuntimeError, OSError) as e:
        logger.warning("fp32 CPU kernels unavailable (%s); using torch ops", e)
        return None
    logger.info("fp32 CPU kernels: %s build (GEMM tiles: %s), %s", kernels.isa, kernels.gemm_isa, kernels.path)
    return kernels


def fp32_cpu_kernels(*tensors: torch.Tensor) -> CpuFp32Kernels | None:
    """The kernels when every tensor is an fp32 CPU tensor and they could be built, else None."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    return load()


def heads_contiguous(x: torch.Tensor) -> bool:
    """[T, H, D] whose heads lie D apart within a token (any token stride, e.g. a view of a fused
    QKV output): the layout the rotary, KV-write and attention kernels read."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
