"""GGUF block kernels (gguf_cpu.c) against dequantize-then-fp32-matmul, per type, on random blocks.

The reference dequantization is the gguf package's own numpy code; the kernels must rebuild the same
weight values and (where the C path runs) sum them exactly as the fp32 C kernel does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kernels.cpu import gguf_ops
from engine.kernels.cpu.ops import load as load_fp32
from engine.layers.quantization.gguf import GGUFLinearMethod, gguf_rows
from engine.layers.quantization.gguf_blocks import (
    FORMATS, KERNEL_TYPES, Q4_1, block_values, dequantize, quantize_reference, row_bytes,
)

TYPES = sorted(KERNEL_TYPES)


def random_blocks(n: int, k: int, type_id: int, seed: int = 0) -> torch.Tensor:
    """Random bytes (every quant, packed scale and fifth bit) with random finite fp16 scales of
    realistic size (the second of two, a minimum, negative)."""
    g = torch.Generator().manual_seed(seed)
    f = FORMATS[type_id]
    nb = k // f.values
    blocks = torch.randint(0, 256, (n, nb, f.nbytes), dtype=torch.uint8, generator=g)
    for i, at in enumerate(f.half_offsets):
        sign = -1 if i else 1
        blocks[..., at:at + 2] = (sign * (torch.rand(n, nb, 1, generator=g) * 0.02 + 1e-4)).half().view(torch.uint8)
    return blocks.reshape(n, nb * f.nbytes)


def width(type_id: int, blocks: int) -> int:
    """K of ``blocks`` whole blocks of the type (32 or 256 values each)."""
    return blocks * block_values(type_id)


def gguf_reference(blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType, dequantize as np_dequantize

    return torch.from_numpy(np.ascontiguousarray(np_dequantize(blocks.numpy(), GGMLQuantizationType(type_id))))


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """y == x @ w.T (+ bias) within fp32 summation error, which is relative to sum |x| |w|."""
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    scale = x.abs().double() @ w.abs().double().t()
    assert ((y.double() - ref).abs() <= 1e-6 * scale + 1e-5).all(), (y.double() - ref).abs().max()


@pytest.fixture(scope="module")
def kernels():
    k = gguf_ops.load()
    if k is None:
        pytest.skip("no C compiler: the GGUF kernels cannot be built")
    return k


@pytest.mark.parametrize("type_id", TYPES, ids=[KERNEL_TYPES[t] for t in TYPES])
def test_dequantization_equals_the_gguf_package(kernels, type_id):
    k = width(type_id, 3)
    blocks = random_blocks(37, k, type_id)
    ref = gguf_reference(blocks, type_id)
    assert torch.equal(dequantize(blocks, type_id, k), ref)
    assert torch.equal(kernels.dequant(blocks, type_id, k), ref)
    ids = torch.tensor([[5, 0], [36, 5]])
    assert torch.equal(kernels.dequant_rows(blocks, type_id, k, ids), ref[ids])


@pytest.mark.parametrize("type_id", TYPES, ids=[KERNEL_TYPES[t] for t in TYPES])
@pytest.mark.parametrize("m", [1, 7, 13, 64, 300])  # 13: the AVX-512 paired tiles with a row tail
def test_kernel_equals_dequantize_then_matmul(kernels, type_id, m):
    n, k = 45, width(type_id, 5 if block_values(type_id) == 32 else 2)  # N leaves a tail in every tile size
    blocks = random_blocks(n, k, type_id, seed=m)
    w = gguf_reference(blocks, type_id)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    y = kernels.linear(x, blocks, type_id, k, bias)
    assert_matmul_close(y, x, w, bias)
    fp32 = load_fp32()
    if fp32 is not None:  # the same summation as the fp32 kernel: the same bits
        assert torch.equal(y, fp32.linear(x, w, bias))


@pytest.mark.parametrize("m", [1, 7, 13, 64, 300])  # 13: the AVX-512 paired tiles with a row tail
def test_layer_method_at_every_batch_size(kernels, m):
    """Through GGUFLinearMethod: the C kernel up to 64 rows, dequantized slabs + torch past it."""
    n, k = 70, 64
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(random_blocks(n, k, Q4_1, seed=3), requires_grad=False)
    layer.bias = None
    layer.gguf_type, layer.gguf_k = Q4_1, k
    w = gguf_reference(layer.weight.data, Q4_1)
    x = torch.randn(m, k)
    y = GGUFLinearMethod().apply(layer, x)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(gguf_rows(layer, torch.tensor([3, 69])), w[[3, 69]])


def test_torch_fallback_without_the_kernels(monkeypatch):
    n, k = 20, 64
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(random_blocks(n, k, Q4_1, seed=4), requires_grad=False)
    layer.bias = None
    layer.gguf_type, layer.gguf_k = Q4_1, k
    monkeypatch.setattr(gguf_ops, "load", lambda: None)
    x = torch.randn(3, k)
    torch.testing.assert_close(GGUFLinearMethod().apply(layer, x), x @ gguf_reference(layer.weight.data, Q4_1).t())


@pytest.mark.parametrize("type_id", TYPES, ids=[KERNEL_TYPES[t] for t in TYPES])
def test_reference_quantizer_round_trips(type_id):
    k = width(type_id, 2)
    w = torch.randn(8, k, generator=torch.Generator().manual_seed(type_id))  # seeded: a rare outlier would exceed the bound
    blocks = quantize_reference(w, type_id)
    assert blocks.shape == (8, row_bytes(type_id, k))
    err = (dequantize(blocks, type_id, k) - w).abs().max().item()
    assert err < (0.05 if type_id == 8 else 0.5)
    assert torch.equal(dequantize(blocks, type_id, k), gguf_reference(blocks, type_id))


@pytest.mark.parametrize("march,isa", [("x86-64", "generic"), ("x86-64-v3", "avx2")])
def test_other_builds_match(tmp_path, march, isa):
    """The portable C path (plain x86-64) and the AVX2 path without AVX-512 (x86-64-v3) give the
    reference values too (the native build on an AVX-512 machine takes a third path)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("these builds are checked on x86-64")
    from engine.kernels.cpu.build import build, cpu_identity

    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= set(cpu_identity().split()):
        pytest.skip("this CPU cannot run an AVX2 build")

    try:
        generic = gguf_ops.CpuGgufKernels(build(gguf_ops.SOURCE, march, tmp_path))
    except (RuntimeError, OSError) as e:
        pytest.skip(str(e))
    assert generic.isa == isa
    for type_id in TYPES:
        k = width(type_id, 2)
        blocks = random_blocks(13, k, type_id, seed=type_id)
        ref = gguf_reference(blocks, type_id)
        assert torch.equal(generic.dequant(blocks, type_id, k), ref)
        x = torch.randn(5, k)
        assert_matmul_close(generic.linear(x, blocks, type_id, k), x, ref)
        assert_matmul_close(generic.linear(x[:1], blocks, type_id, k), x[:1], ref)
