"""The packed fp32 GEMM (engine/kernels/cpu/fp32_gemm.c): close to a float64 reference at every row
count and shape tail, each row's result independent of the batch bit for bit (one FMA chain per
output), the portable build equal to the AVX2 one bit for bit, and its use by the linear layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.cpu import ops


@pytest.fixture(scope="module")
def kernels() -> ops.CpuFp32Kernels:
    k = ops.load()
    assert k is not None and k.has_gemm, "the fp32 CPU kernels must build on this machine"
    return k


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).float()


# rows: 1-3 (small tiles over panel groups), 4-5 (split small tiles), 6 (one 6-row tile), 8 (one
# AVX-512 8-row tile), 7, 14, 15, 64 and 300 (tiles plus 6-row and small tails, row blocks of 144);
# shapes: whole groups of 96 channels, a partial panel, K past a k block of 192, not a multiple of 8
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 64, 300])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (37, 300), (5, 7), (112, 260)])
def test_gemm_matches_a_float64_reference(kernels, m, n, k):
    torch.manual_seed(m * 7 + n + k)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    packed = kernels.pack(w)
    tol = 4e-6 * k ** 0.5 * 8  # fp32 summation error of a length-k dot product of unit normals
    for bias in (b, None):
        got = kernels.gemm_packed(x, packed, n, bias)
        assert got.shape == (m, n)
        assert (got - reference(x, w, bias)).abs().max().item() < tol


def test_rows_do_not_depend_on_the_batch(kernels):
    torch.manual_seed(1)
    x, w, b = torch.randn(301, 576), torch.randn(963, 576), torch.randn(963)
    packed = kernels.pack(w)
    full = kernels.gemm_packed(x, packed, 963, b)
    for i in [0, 1, 2, 5, 6, 8, 13, 95, 96, 97, 143, 144, 145, 200, 300]:  # alone, at every place in tiles and blocks
        for lo in (i, max(0, i - 1), max(0, i - 4), max(0, i - 7), max(0, i - 100)):
            part = kernels.gemm_packed(x[lo : i + 1], packed, 963, b)
            assert torch.equal(part[-1], full[i]), (i, lo)


def test_strided_rows_and_a_repacked_weight(kernels):
    torch.manual_seed(2)
    base = torch.randn(9, 700)
    x = base[:, 50:626]  # rows 700 floats apart
    w = torch.randn(192, 576)
    got = kernels.gemm_packed(x, kernels.pack(w), 192)
    assert torch.equal(got, kernels.gemm_packed(x.contiguous(), kernels.pack(w), 192))
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_the_portable_build_gives_the_same_bits(kernels, march):
    """Machines without AVX2 get the plain-C path (a scalar fmaf chain in the same order), AVX2-only
    machines 8-lane tiles, AVX-512 ones (the native build where the CPU has it) 16-lane tiles: the
    same bits from each, at every row count a group's tiles take (1..8, and more)."""
    from engine.kernels.cpu.build import build

    other = ops.CpuFp32Kernels(build(ops.SOURCE, march), None, build(ops.GEMM_SOURCE, march))
    torch.manual_seed(3)
    shapes = [(m, 192, 576) for m in (1, 2, 3, 4, 5, 6, 8, 13, 14, 15, 150)] + [(1, 96, 64), (5, 37, 300), (7, 112, 260)]
    for m, n, k in shapes:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        assert torch.equal(other.gemm_packed(x, other.pack(w), n, b), kernels.gemm_packed(x, kernels.pack(w), n, b))


def test_the_native_build_takes_the_widest_tiles_the_cpu_has(kernels):
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "generic"
    assert kernels.gemm_isa == expected


def test_linear_layers_use_it_and_repack_after_a_write(kernels):
    from engine.layers.quantization.base import UnquantizedLinearMethod

    torch.manual_seed(4)
    layer = torch.nn.Linear(576, 960)
    layer.weight.requires_grad_(False)
    method = UnquantizedLinearMethod()
    for m in (1, 40, 200):  # every batch size, also past the row-major kernel's 64-row range
        x = torch.randn(m, 576)
        with torch.no_grad():
            assert torch.equal(method.apply(layer, x), kernels.gemm_packed(x, kernels.pack(layer.weight), 960, layer.bias))
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place write: the packed copy must follow
        x = torch.randn(3, 576)
        torch.testing.assert_close(method.apply(layer, x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)


def test_fma_peak_loop_counts_its_flops(kernels):
    """The ceiling's FMA loop (engine/bench/ceilings.py): 12 vector FMA chains per thread and round,
    in the lanes of this build, on every OpenMP thread of the runtime."""
    lanes = {"avx512": 16, "avx2": 8, "generic": 1}[kernels.gemm_isa]
    assert kernels.fma_flops(1000) == torch.get_num_threads() * 1000 * 12 * 2 * lanes
    assert kernels.fma_flops(0) == 0
