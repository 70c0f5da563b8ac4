"""What this machine can do at best, and what that means for one model: memory read bandwidth and
the matrix-multiply rate (fp32, bf16, int8) with the thread count the engine uses, and for a model

- the floor for one decode step: bytes of weights (and KV) a step must read / read bandwidth;
- the ceiling for tokens/s at large batch: a workload's FLOPs / fp32 matmul rate (the faster of
  torch's and the engine's packed GEMM at 2048^3), counting the layers for every token and the LM
  head for the sampled ones only (the engine computes logits at a prompt's last position alone);
- the fp32 FMA peak: 12 independent vector FMA chains per thread on registers, no memory. No GEMM
  passes it; it says how far the matmul ceiling itself is from the hardware.

``bench throughput`` measures these in the same run, before and after the engine, and reports its
results as fractions of them; ``python benchmarks/ceilings.py`` prints them alone. The machine is
shared and noisy: every figure is the best of several repeats.
"""
from __future__ import annotations

import time
from dataclasses import astuple, dataclass

import torch


@dataclass
class Ceilings:
    threads: int
    read_gbps: float  # GB/s streaming a large buffer (bytes read)
    copy_gbps: float  # GB/s of a large copy (bytes read + written)
    fp32_gflops: float  # 2048^3: the faster of torch.mm and the engine's packed GEMM
    bf16_gflops: float
    int8_gops: float  # torch._int_mm, int32 accumulation
    fp32_peak_gflops: float = 0.0  # the FMA loop of the engine's GEMM build (0 without its C kernels)

    def best(self, other: "Ceilings") -> "Ceilings":
        """The higher of two measurements of each figure: on a noisy machine the fractions reported
        against ceilings measured at two moments are then never flattered by a slow moment."""
        return Ceilings(*(max(a, b) for a, b in zip(astuple(self), astuple(other))))


@dataclass
class ModelCosts:
    weight_bytes: int  # bytes of weights one forward step reads (linear layers + LM head)
    flops_per_token: float  # matmul FLOPs of one token through all layers and the LM head
    lm_head_flops_per_token: float  # the LM head's share of flops_per_token
    attn_flops_per_ctx_token: float  # extra FLOPs per token per token of context (QK^T and PV)
    kv_bytes_per_token: int  # K and V of one token, all layers

    def decode_floor_s(self, c: Ceilings, batch: int = 1, context: int = 0) -> float:
        """A decode step reads every weight once and the KV of its context: no faster than this."""
        return (self.weight_bytes + batch * context * self.kv_bytes_per_token) / (c.read_gbps * 1e9)

    def compute_ceiling_tps(self, c: Ceilings, context: int = 0) -> float:
        """Tokens/s at large batch if every FLOP ran at the fp32 matmul rate."""
        return c.fp32_gflops * 1e9 / (self.flops_per_token + context * self.attn_flops_per_ctx_token)

    def workload_flops(self, prompt_tokens: int, output_tokens: int, context: int = 0) -> float:
        """FLOPs of a generation workload: the layers (and attention at mean ``context``) for every
        token, the LM head only for sampled ones. Counting it for every prompt token would credit a
        prefill-heavy run with a fifth more work than it did."""
        layer = self.flops_per_token - self.lm_head_flops_per_token + context * self.attn_flops_per_ctx_token
        return (prompt_tokens + output_tokens) * layer + output_tokens * self.lm_head_flops_per_token


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(mib: int = 512, repeats: int = 7) -> tuple[float, float]:
    """(read GB/s, copy GB/s) over buffers far larger than the caches."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    read = src.numel() * 4 / best_time(lambda: src.sum(), repeats) / 1e9
    copy = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeats) / 1e9
    return read, copy


def measure_matmul(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Rate of an n x n x n matmul in G(FL)OP/s."""
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        b = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    rate = 2 * n**3 / best_time(fn, repeats) / 1e9
    if dtype == torch.float32:
        rate = max(rate, packed_gemm_gflops(a, b, repeats))
    return rate


def fma_peak_gflops(repeats: int = 5, iters: int = 2_000_000) -> float:
    """The fp32 FMA peak of the engine's GEMM build on every thread (0 without its C kernels)."""
    from engine.kernels.cpu.ops import load

    kernels = load()
    if kernels is None or not kernels.has_gemm:
        return 0.0
    flops = kernels.fma_flops(iters)
    return flops / best_time(lambda: kernels.fma_flops(iters), repeats) / 1e9


def packed_gemm_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    """Rate of ``a @ b`` through the engine's packed fp32 GEMM (engine/kernels/cpu/fp32_gemm.c), 0
    without its C kernels. Where it outruns torch's own matmul (1.7-2.3x on an AVX-512 EPYC), torch's
    rate is no ceiling: the fp32 ceiling is the faster of the two."""
    from engine.kernels.cpu.ops import load

    kernels = load()
    if kernels is None or not kernels.has_gemm:
        return 0.0
    packed = kernels.pack(b.t().contiguous())  # the GEMM computes x @ W.T for a row-major W
    n = b.shape[1]
    return 2 * a.shape[0] * a.shape[1] * n / best_time(lambda: kernels.gemm_packed(a, packed, n), repeats) / 1e9


@dataclass(frozen=True)
class CeilingSizes:
    """Buffer and matrix sizes of one measurement: ``full`` is what fractions are reported against;
    ``tiny`` (tests) takes well under a second and says little about the machine."""
    read_mib: int
    fp32_n: int
    bf16_n: int
    int8_n: int


SIZES = {"full": CeilingSizes(512, 2048, 256, 2048), "quick": CeilingSizes(256, 1024, 256, 1024),
         "tiny": CeilingSizes(32, 256, 64, 128)}


def measure(quick: bool = False, wait_quiet_s: float = 60.0, size: str | None = None) -> Ceilings:
    """The machine's ceilings (``size``: a key of SIZES; default full, or quick), after waiting (up
    to ``wait_quiet_s``) for other processes to go quiet: a neighbour's load would lower every
    ceiling and flatter every fraction of it."""
    if wait_quiet_s > 0:
        from engine.bench.machine import wait_for_quiet

        wait_for_quiet(timeout_s=wait_quiet_s)
    s = SIZES[size or ("quick" if quick else "full")]
    read, copy = measure_bandwidth(s.read_mib)
    return Ceilings(
        threads=torch.get_num_threads(),
        read_gbps=read,
        copy_gbps=copy,
        fp32_gflops=measure_matmul(torch.float32, s.fp32_n),
        bf16_gflops=measure_matmul(torch.bfloat16, s.bf16_n, repeats=2),  # ~100x slower than fp32 on AVX2
        int8_gops=measure_matmul(torch.int8, s.int8_n),
        fp32_peak_gflops=fma_peak_gflops(iters=200_000 if size == "tiny" else 2_000_000),
    )


def model_costs(hf_config, weight_bytes_per_param: float = 4.0, kv_bytes_per_elem: int = 4) -> ModelCosts:
    """Counts the weights and FLOPs of a Llama-family model from its config."""
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    d = getattr(hf_config, "head_dim", None) or h // heads
    inter = hf_config.intermediate_size
    layers = hf_config.num_hidden_layers
    per_layer = h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * inter
    params = layers * per_layer + hf_config.vocab_size * h  # the LM head (tied or not) is read each step
    return ModelCosts(
        weight_bytes=int(params * weight_bytes_per_param),
        flops_per_token=2.0 * params,
        lm_head_flops_per_token=2.0 * hf_config.vocab_size * h,
        attn_flops_per_ctx_token=4.0 * layers * heads * d,
        kv_bytes_per_token=2 * layers * kv_heads * d * kv_bytes_per_elem,
    )
