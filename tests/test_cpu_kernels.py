"""The fp32 C kernels (engine/kernels/cpu/fp32_cpu.c) against torch, and the kernel plans that replay
them: values close to torch's, rows independent of the rest of the batch bit for bit, edge cases
(tails, padding slots, chunk boundaries, extreme activations)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import torch_ref
from engine.kernels.cpu import ops
from engine.kernels.cpu.plan import KernelPlan, recording


@pytest.fixture(scope="module")
def kernels() -> ops.CpuFp32Kernels:
    k = ops.load()
    assert k is not None, "the fp32 CPU kernels must build on this machine (gcc is part of the project's platform)"
    return k


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 33])
@pytest.mark.parametrize("n,k", [(7, 5), (24, 64), (50, 77), (1000, 576)])
def test_linear_matches_torch(kernels, m, n, k):
    torch.manual_seed(m * n + k)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_linear_rows_do_not_depend_on_the_batch(kernels):
    torch.manual_seed(0)
    x, w = torch.randn(13, 576), torch.randn(963, 576)
    full = kernels.linear(x, w)
    for i in range(13):  # alone, and at every position of a tile of other rows
        assert torch.equal(kernels.linear(x[i : i + 1], w), full[i : i + 1])
        assert torch.equal(kernels.linear(x[max(0, i - 2) : i + 1], w)[-1], full[i])


def test_linear_reads_strided_rows(kernels):
    base = torch.randn(6, 100)
    x = base[:, 10:74]  # row stride 100
    w = torch.randn(30, 64)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_rms_norm_with_and_without_residual(kernels):
    torch.manual_seed(1)
    x, r, w = torch.randn(5, 576), torch.randn(5, 576), torch.randn(576)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), torch_ref.rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    residual = r.clone()
    out, new_res = kernels.rms_norm(x, w, 1e-5, residual)
    ref_out, ref_res = torch_ref.rms_norm(x, w, 1e-5, r)
    assert new_res is residual  # updated in place: the residual stream needs no new tensor
    assert torch.equal(residual, ref_res)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)


def test_rms_norm_has_the_same_bits_in_every_build_and_batch(kernels):
    """The sum of squares runs in 8 double lanes in a fixed order: the AVX-512, AVX2 and plain-C
    builds give the same bits, rows alone equal rows in a batch, and widths with a tail (H % 8) too."""
    from tests.isa_builds import isa_builds

    builds = isa_builds(kernels, lambda march: ops.CpuFp32Kernels(ops.build(ops.SOURCE, march)))
    gen = torch.Generator().manual_seed(4)
    for h in (576, 61, 8):
        x, r, w = torch.randn(20, h, generator=gen) * 30, torch.randn(20, h, generator=gen), torch.randn(h, generator=gen)
        want_out, want_res = torch_ref.rms_norm(x, w, 1e-5, r.clone())
        outs = {}
        for name, k in builds.items():
            res = r.clone()
            out, _ = k.rms_norm(x, w, 1e-5, res)
            outs[name] = (out, res)
            assert torch.equal(res, want_res), name
            torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
            alone = torch.cat([k.rms_norm(x[i : i + 1], w, 1e-5, r[i : i + 1].clone())[0] for i in range(20)])
            assert torch.equal(alone, out), name
        first = next(iter(outs.values()))[0]
        assert all(torch.equal(o, first) for o, _ in outs.values()), h


def test_silu_and_mul_including_extremes(kernels):
    torch.manual_seed(2)
    x = torch.randn(7, 2 * 1539) * 4  # an odd width: vector body and scalar tail
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(kernels.silu_and_mul(x), F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    edge = torch.tensor([-1e4, -100.0, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-3, 1.0, 20.0, 88.0, 88.8, 100.0, 1e4])
    got = kernels.silu_and_mul(torch.cat([edge, torch.ones_like(edge)])[None])[0]
    torch.testing.assert_close(got, F.silu(edge), rtol=2e-6, atol=1e-30)


def test_rotary_on_strided_views_matches_torch(kernels):
    torch.manual_seed(3)
    t, h, kvh, d = 6, 9, 3, 64
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.tensor([0, 1, 7, 100, 2047, 5])
    cache = torch.randn(2048, d)
    kernels.rotary_(positions, q, k, cache)
    torch_ref.rotary_embedding(positions, q_ref, k_ref, cache)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-6)


def test_write_kv_skips_padding_slots(kernels):
    k_cache, v_cache = torch.zeros(4, 16, 3, 64), torch.zeros(4, 16, 3, 64)
    key, value = torch.randn(3, 3, 64), torch.randn(3, 3, 64)
    slots = torch.tensor([5, -1, 40])
    kernels.write_kv(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 3, 64), v_cache.view(-1, 3, 64)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_v[40], value[2])
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 2  # the -1 row went nowhere


def _paged(lens, bs, kvh, d, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // bs) for n in lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    i = 0
    for r, nb in enumerate(blocks):
        tables[r, :nb] = torch.tensor(perm[i : i + nb], dtype=torch.int32)
        i += nb
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g)
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("h,kvh,d", [(9, 3, 64), (4, 4, 128), (8, 2, 40)])
def test_paged_decode_attention_matches_torch(kernels, h, kvh, d):
    lens = [1, 31, 32, 33, 100, 16, 257]  # around the 32-key chunks and the 16-token blocks
    k_cache, v_cache, tables, seq_lens = _paged(lens, 16, kvh, d, seed=h + d)
    q = torch.randn(len(lens), h, d) * 2
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d**-0.5, out)
    ref = torch_ref.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    for i in (0, 3, 6):  # one request alone gives the same bits as inside the batch
        alone = torch.empty(1, h, d)
        kernels.paged_decode_attention(q[i : i + 1], k_cache, v_cache, tables[i : i + 1], seq_lens[i : i + 1],
                                       d**-0.5, alone)
        assert torch.equal(alone[0], out[i])


def test_a_recorded_plan_replays_on_new_inputs(kernels):
    x, w1, w2 = torch.randn(3, 64), torch.randn(128, 64), torch.randn(64, 64)
    plan = KernelPlan(kernels.run_plan)
    with recording(plan):
        y = kernels.linear(kernels.silu_and_mul(kernels.linear(x, w1)), w2)
    assert len(plan) == 3
    x.copy_(torch.randn(3, 64))  # new values at the recorded address
    y.zero_()
    plan.replay()
    gate, up = F.linear(x, w1).chunk(2, -1)
    torch.testing.assert_close(y, F.linear(F.silu(gate) * up, w2), rtol=1e-5, atol=1e-4)


def test_plans_do_not_nest(kernels):
    with recording(KernelPlan(kernels.run_plan)):
        with pytest.raises(RuntimeError, match="being recorded already"):
            with recording(KernelPlan(kernels.run_plan)):
                pass


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ENGINE_CPU_KERNELS", "0")
    ops.load.cache_clear()
    try:
        assert ops.load() is None
        assert ops.fp32_cpu_kernels(torch.zeros(1)) is None
    finally:
        monkeypatch.delenv("ENGINE_CPU_KERNELS")
        ops.load.cache_clear()
    assert ops.fp32_cpu_kernels(torch.zeros(1)) is not None
    assert ops.fp32_cpu_kernels(torch.zeros(1, dtype=torch.bfloat16)) is None


def test_the_portable_build_without_avx2_gives_the_same_results(kernels):
    """Machines without AVX2 get the plain-C paths of the same source (-march=x86-64)."""
    from engine.kernels.cpu.build import build

    portable = ops.CpuFp32Kernels(build(ops.SOURCE, "x86-64"))
    assert portable.isa == "generic" and kernels.isa in ("avx2", "generic")
    torch.manual_seed(4)
    x, w, b = torch.randn(5, 77), torch.randn(19, 77), torch.randn(19)
    torch.testing.assert_close(portable.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    g = torch.randn(3, 2 * 21) * 4
    torch.testing.assert_close(portable.silu_and_mul(g), F.silu(g[:, :21]) * g[:, 21:], rtol=2e-6, atol=1e-6)
    k_cache, v_cache, tables, seq_lens = _paged([1, 40, 70], 16, 3, 64, seed=5)
    q = torch.randn(3, 9, 64)
    out = torch.empty_like(q)
    portable.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, out)
    ref = torch_ref.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
