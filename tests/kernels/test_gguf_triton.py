"""The Triton GGUF matmul (engine/kernels/gguf_matmul.py) in Triton's interpreter: for each block
type (the 32-value ones and the k-quants) it equals dequantize-then-matmul on random blocks, at 1,
7, 64 and 300 rows, with tails in rows, output features and K (K not a multiple of the kernel's K
tile for the 32-value types)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.gguf_matmul import gguf_matmul, launch_config
from engine.layers.quantization.gguf_blocks import (
    KERNEL_TYPES, Q4_0, Q8_0, block_values, dequantize, quantize_reference,
)
from tests.test_gguf_kernels import random_blocks

TYPES = sorted(KERNEL_TYPES)


@pytest.mark.parametrize("type_id", TYPES, ids=[KERNEL_TYPES[t] for t in TYPES])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_equals_dequantize_then_matmul(type_id, m):
    g = torch.Generator().manual_seed(type_id * 1000 + m)
    # 40: not a multiple of BLOCK_N; 96 = 3 GGUF blocks, 1.5 K tiles; a k-quant: 2 super-blocks
    n, k = 40, 96 if block_values(type_id) == 32 else 512
    blocks = quantize_reference(torch.randn(n, k, generator=g), type_id)
    if m == 7:  # random bytes: every quant value, scale and fifth bit, not only those a quantizer writes
        blocks = random_blocks(n, k, type_id, seed=m)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    got = gguf_matmul(x, blocks, type_id, k, bias)
    w = dequantize(blocks, type_id, k)
    ref = (x.double() @ w.double().T + bias.double()).float()
    # fp32 accumulation of 96 products of O(1) values: a few ulps of the row's magnitude
    scale = (x.abs().double() @ w.abs().double().T).float()
    assert got.shape == (m, n)
    assert torch.all((got - ref).abs() <= 1e-6 * scale + 1e-6), (got - ref).abs().max()


def test_leading_dims_and_dtype_are_kept():
    blocks = quantize_reference(torch.randn(16, 64), Q8_0)
    x = torch.randn(2, 3, 64)
    y = gguf_matmul(x, blocks, Q8_0, 64)
    assert y.shape == (2, 3, 16) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ dequantize(blocks, Q8_0, 64).T, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_problem():
    blocks = quantize_reference(torch.randn(8, 64), Q4_0)
    with pytest.raises(ValueError, match="supported: Q4_0, Q4_1, Q5_0.*Q6_K"):
        gguf_matmul(torch.randn(1, 64), blocks, 20, 64)  # IQ4_NL
    with pytest.raises(ValueError, match="do not hold rows"):
        gguf_matmul(torch.randn(1, 96), blocks, Q4_0, 96)


def test_decode_rows_get_the_smallest_dot_tile():
    assert launch_config(1)[0] == 16 and launch_config(64)[0] == 64
