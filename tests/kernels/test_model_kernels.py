"""The C kernels some families need (engine/kernels/cpu/fp32_models.c) against torch, and the layers
that call them: per-head RMSNorm on a strided view of a fused QKV output, GeLU-and-mul."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import torch_ref
from engine.kernels.cpu.ops import load

pytestmark = pytest.mark.skipif(load() is None, reason="the C kernels cannot be built here")


def test_rms_norm_heads_on_a_qkv_view():
    qkv = torch.randn(5, (4 + 2 * 2) * 16)
    q = qkv[:, :64].view(5, 4, 16)  # token stride 128, heads contiguous
    w = torch.randn(16)
    got = load().rms_norm_heads(q, w, 1e-6)
    want = torch_ref.rms_norm(q.reshape(20, 16).contiguous(), w, 1e-6).view(5, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    from engine.layers.norm import RMSNorm

    norm = RMSNorm(16, 1e-6)
    norm.weight.data.copy_(w)
    torch.testing.assert_close(norm.forward_heads(q), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_and_mul(approximate):
    from engine.layers.activation import GeluAndMul

    x = torch.randn(7, 96) * 3
    want = F.gelu(x[:, :48], approximate=approximate) * x[:, 48:]
    torch.testing.assert_close(GeluAndMul(approximate)(x), want, rtol=1e-5, atol=1e-5)
