"""Backend selection: auto picks Triton on CUDA, the C kernels on CPU (torch where they cannot be built); impossible choices fail with a clear
ValueError at start-up; CPU runs never import triton or xformers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention.backends.selector import get_attention_backend
from engine.attention.backends.torch_backend import TorchAttentionBackend
from engine.attention.backends.xformers_backend import XFormersAttentionBackend, xformers_available
from tests.kernels.paged import make_metadata, make_paged_cache

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
ROOT = Path(__file__).resolve().parents[2]


def test_auto_on_cpu_is_the_c_backend():
    from engine.attention.backends.cpu_backend import CpuAttentionBackend

    assert isinstance(get_attention_backend("auto", CPU), CpuAttentionBackend)
    assert isinstance(get_attention_backend("cpu", CPU), CpuAttentionBackend)
    backend = get_attention_backend("torch", CPU)
    assert isinstance(backend, TorchAttentionBackend) and not isinstance(backend, CpuAttentionBackend)


def test_auto_on_cpu_without_the_c_kernels_is_torch(monkeypatch):
    from engine.attention.backends.cpu_backend import CpuAttentionBackend
    from engine.kernels.cpu import ops

    monkeypatch.setattr(ops, "load", lambda march="native": None)
    backend = get_attention_backend("auto", CPU)
    assert isinstance(backend, TorchAttentionBackend) and not isinstance(backend, CpuAttentionBackend)
    with pytest.raises(ValueError, match="attention_backend='cpu' needs the C kernels"):
        get_attention_backend("cpu", CPU)
    with pytest.raises(ValueError, match="runs on CPU, not cuda"):
        get_attention_backend("cpu", CUDA)


def test_auto_on_cuda_is_triton():
    from engine.attention.backends.triton_backend import TritonAttentionBackend

    assert isinstance(get_attention_backend("auto", CUDA), TritonAttentionBackend)
    assert isinstance(get_attention_backend("triton", CUDA), TritonAttentionBackend)
    assert isinstance(get_attention_backend("torch", CUDA), TorchAttentionBackend)


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown attention_backend='flash'.*auto, triton, cpu, torch, xformers"):
        get_attention_backend("flash", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from engine.attention.backends.triton_backend import TritonAttentionBackend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA devices.*TRITON_INTERPRET=1"):
        get_attention_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(get_attention_backend("triton", CPU), TritonAttentionBackend)


def test_xformers_on_cpu_is_rejected():
    with pytest.raises(ValueError, match="xformers.*needs a CUDA device"):
        get_attention_backend("xformers", CPU)


@pytest.mark.skipif(xformers_available(), reason="checks the message shown when xformers is not installed")
def test_xformers_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers is not importable"):
        get_attention_backend("xformers", CUDA)


def test_cpu_engine_path_imports_neither_triton_nor_xformers():
    code = (
        "import sys, torch\n"
        "import engine.worker.model_runner, engine.layers.norm, engine.layers.rotary, engine.layers.attention\n"
        "from engine.attention.backends.selector import get_attention_backend\n"
        "get_attention_backend('auto', torch.device('cpu'))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'xformers')]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


class _TorchXFormers:
    """Stand-in for the two xformers entry points the backend calls, implementing their documented
    contract in torch: BMGHK layout, and a block-diagonal mask that is causal from the bottom right."""

    class Mask:
        def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]) -> None:
            self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

        @classmethod
        def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int]) -> "_TorchXFormers.Mask":
            return cls(list(q_seqlen), list(kv_seqlen))

        def materialize(self) -> torch.Tensor:
            mask = torch.zeros(sum(self.q_seqlen), sum(self.kv_seqlen), dtype=torch.bool)
            q0 = k0 = 0
            for q, k in zip(self.q_seqlen, self.kv_seqlen):
                rows = torch.arange(q)[:, None] + (k - q)
                mask[q0 : q0 + q, k0 : k0 + k] = torch.arange(k)[None, :] <= rows
                q0, k0 = q0 + q, k0 + k
            return mask

    @staticmethod
    def attend(q, k, v, attn_bias, scale):  # type: ignore[no-untyped-def]
        b, m, g, h, d = q.shape
        assert b == 1 and k.shape[2:] == (g, h, d)
        qh, kh, vh = (x[0].flatten(1, 2).transpose(0, 1) for x in (q, k, v))  # [G*H, seq, D]
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_bias.materialize(), scale=scale)
        return o.transpose(0, 1).reshape(1, m, g, h, d)


def test_xformers_backend_glue_matches_torch_backend():
    """The gather of paged contexts, the GQA layout and the mask arguments, with a torch stand-in for
    xformers (not installed here; its kernels need CUDA); decode goes through the Triton kernel."""
    gen = torch.Generator().manual_seed(2)
    h, kvh, d = 6, 2, 64
    seq_lens, query_lens = [20, 70, 30], [1, 25, 30]
    cache = make_paged_cache(seq_lens, 16, kvh, d, torch.float32, gen)
    meta = make_metadata(cache, query_lens, num_decodes=1)
    t = sum(query_lens)
    query, key, value = (torch.randn((t, n, d), generator=gen) for n in (h, kvh, kvh))
    k_ref, v_ref = cache.k_cache.clone(), cache.v_cache.clone()
    expected = TorchAttentionBackend().forward(query, key, value, k_ref, v_ref, meta, 0.125)
    backend = XFormersAttentionBackend((_TorchXFormers.attend, _TorchXFormers.Mask))
    got = backend.forward(query, key, value, cache.k_cache, cache.v_cache, meta, 0.125)
    assert torch.equal(cache.k_cache, k_ref)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
