"""The int8 KV cache format (engine/attention/kv_format.py) and its C kernels: rows and scales, the C
write against the torch format bit for bit, the C decode kernel against the fp32 one on the
dequantized cache bit for bit and against a float64 reference, the CPU and torch backends on one
mixed step, and where the format is refused."""
from __future__ import annotations

import pytest
import torch

from engine.attention.backends.cpu_backend import CpuAttentionBackend
from engine.attention.backends.selector import get_attention_backend
from engine.attention.backends.torch_backend import TorchAttentionBackend
from engine.attention.kv_format import KVCacheFormat, Int8KVFormat, make_kv_format
from engine.kernels import torch_ref
from engine.kernels.cpu import ops
from tests.isa_builds import isa_builds
from tests.kernels.paged import PagedCache, make_metadata, make_paged_cache

INT8 = Int8KVFormat(torch.float32)


def _builds() -> dict[str, ops.CpuFp32Kernels]:
    """The native build and, on x86, the AVX2 and plain-C builds: every path of the int8 code runs."""
    return isa_builds(ops.load(), lambda march: ops.CpuFp32Kernels(ops.build(ops.SOURCE, march)))


def _int8_cache(cache: PagedCache) -> PagedCache:
    nb, bs, kvh, d = cache.k_cache.shape
    k = INT8.store(cache.k_cache.flatten(0, 1)).view(nb, bs, kvh, d + 4)
    v = INT8.store(cache.v_cache.flatten(0, 1)).view(nb, bs, kvh, d + 4)
    return PagedCache(k, v, cache.block_tables, cache.seq_lens)


def test_rows_hold_int8_values_and_their_scale():
    x = torch.randn(5, 3, 64) * torch.tensor([1e-3, 0.1, 1, 10, 100])[:, None, None]
    x[2, 1] = 0
    rows = INT8.store(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 68)
    scale = rows[..., 64:].contiguous().view(torch.float32)[..., 0]
    q = rows[..., :64]
    assert torch.equal(scale[2, 1], torch.tensor(1.0)) and bool((q[2, 1] == 0).all())  # a zero row
    nonzero = torch.ones(5, 3, dtype=torch.bool)
    nonzero[2, 1] = False
    assert bool((q.abs().amax(-1)[nonzero] == 127).all())  # every other row uses the full range
    err = (INT8.load(rows) - x).abs()
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-6)).all())  # half a step at most
    # .5 ties round to even: max 127 makes the scale exactly 1
    ties = torch.tensor([[[127.0, 2.5, -120.5, 0.5, 1.5, -3.5, 0.0, 7.0]]])
    assert INT8.store(ties)[0, 0, :8].tolist() == [127, 2, -120, 0, 2, -4, 0, 7]


def test_bytes_per_block_and_shapes():
    fp32, int8 = make_kv_format("auto", torch.float32), make_kv_format("int8", torch.float32)
    assert isinstance(fp32, KVCacheFormat) and fp32.exact and not int8.exact
    assert fp32.cache_shape(10, 16, 3, 64) == (10, 16, 3, 64) and int8.cache_shape(10, 16, 3, 64) == (10, 16, 3, 68)
    assert fp32.bytes_per_block(16, 3, 64) == 2 * 16 * 3 * 64 * 4
    assert int8.bytes_per_block(16, 3, 64) == 2 * 16 * 3 * 68  # 3.76x the tokens in the same bytes
    assert make_kv_format("auto", torch.bfloat16).bytes_per_block(16, 3, 64) == 2 * 16 * 3 * 64 * 2
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'int8'"):
        make_kv_format("fp8", torch.float32)


@pytest.mark.parametrize("d", [64, 128, 40])
def test_c_write_stores_the_bits_of_the_torch_format(d):
    gen = torch.Generator().manual_seed(d)
    t, kvh, nb, bs = 41, 3, 12, 16
    for name, kernels in _builds().items():
        key = torch.randn(t, kvh, d, generator=gen) * torch.rand(t, kvh, 1, generator=gen) * 20
        value = torch.randn(t, kvh, d, generator=gen)
        key[4, 2] = 0  # a zero row
        value[7, 0, 5] = 1e-30  # a tiny value among ordinary ones
        slots = torch.randperm(nb * bs, generator=gen)[:t].long()
        slots[[3, 30]] = -1  # padding, skipped
        got_k = torch.zeros(nb, bs, kvh, d + 4, dtype=torch.int8)
        got_v = torch.zeros_like(got_k)
        want_k, want_v = got_k.clone(), got_v.clone()
        kernels.write_kv_int8(key, value, got_k, got_v, slots)
        torch_ref.write_kv(INT8.store(key), INT8.store(value), want_k, want_v, slots)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), name


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (37, 0.0), (0, 30.0)])
def test_c_decode_has_the_bits_of_the_fp32_kernel_on_the_dequantized_cache(window, softcap):
    """Also close to a float64 reference; 2 and 12 requests take the per-head and per-request work
    items; groups of 1, 3 and 4 query heads per KV head."""
    gen = torch.Generator().manual_seed(window + int(softcap))
    d, bs = 64, 16
    for lens, h, kvh in (([300, 1], 4, 1), ([5, 17, 100, 128, 64, 33, 16, 1, 250, 7, 64, 90], 9, 3), ([70, 3], 8, 2)):
        cache = _int8_cache(make_paged_cache(lens, bs, kvh, d, torch.float32, gen))
        k_f, v_f = INT8.load(cache.k_cache).contiguous(), INT8.load(cache.v_cache).contiguous()
        query = torch.randn(len(lens), h, d, generator=gen)
        ref = torch_ref.paged_decode_attention(query.double(), cache.k_cache, cache.v_cache, cache.block_tables,
                                               cache.seq_lens, 0.125, window=window, softcap=softcap,
                                               load=lambda r: INT8.load(r).double())
        for name, kernels in _builds().items():
            got, want = torch.empty(len(lens), h, d), torch.empty(len(lens), h, d)
            kernels.paged_decode_attention_int8(query, cache.k_cache, cache.v_cache, cache.block_tables,
                                                cache.seq_lens, 0.125, got, window, softcap)
            kernels.paged_decode_attention(query, k_f, v_f, cache.block_tables, cache.seq_lens, 0.125, want, window,
                                           softcap)
            assert torch.equal(got, want), name
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_cpu_and_torch_backends_agree_on_a_mixed_int8_step():
    """Two decodes, a prefill chunk after cached context and a fresh prefill: the same cache bytes
    written, and the same attention (both read every key back from the int8 cache)."""
    gen = torch.Generator().manual_seed(3)
    h, kvh, d = 6, 2, 32
    seq_lens, query_lens = [200, 9, 70, 30], [1, 1, 25, 30]
    cache = _int8_cache(make_paged_cache(seq_lens, 16, kvh, d, torch.float32, gen))
    meta = make_metadata(cache, query_lens, num_decodes=2)
    t = sum(query_lens)
    query, key, value = (torch.randn((t, n, d), generator=gen) for n in (h, kvh, kvh))
    cpu = CpuAttentionBackend(ops.load(), INT8)
    torch_backend = TorchAttentionBackend(INT8)
    k_cpu, v_cpu = cache.k_cache.clone(), cache.v_cache.clone()
    got = cpu.forward(query, key, value, k_cpu, v_cpu, meta, 0.125)
    assert cpu._usable(query, key, value, k_cpu, meta)  # the C kernels ran, not the fallback
    want = torch_backend.forward(query, key, value, cache.k_cache, cache.v_cache, meta, 0.125)
    assert torch.equal(k_cpu, cache.k_cache) and torch.equal(v_cpu, cache.v_cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # against the dequantized values attended in float64
    k_f, v_f = INT8.load(cache.k_cache).double(), INT8.load(cache.v_cache).double()
    ref = torch.cat([
        torch_ref.paged_decode_attention(query[:2].double(), k_f, v_f, meta.block_tables[:2], meta.seq_lens[:2], 0.125),
        torch_ref.paged_prefill_attention(query[2:].double(), k_f, v_f, meta.block_tables[2:], [0, 25, 55],
                                          seq_lens[2:], 0.125),
    ])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_backends_for_an_int8_cache():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    backend = get_attention_backend("auto", cpu, INT8)
    assert isinstance(backend, CpuAttentionBackend) and backend.kv.name == "int8"
    assert get_attention_backend("torch", cpu, INT8).kv is INT8
    # on CUDA the Triton kernels read the model's dtype only: auto takes the torch backend
    on_cuda = get_attention_backend("auto", cuda, INT8)
    assert type(on_cuda) is TorchAttentionBackend and on_cuda.kv is INT8
    for name in ("triton", "xformers"):
        message = f"kv_cache_dtype='int8' is implemented by the 'cpu' and 'torch'.*not '{name}'"
        with pytest.raises(ValueError, match=message):
            get_attention_backend(name, cuda, INT8)


def test_engine_args_name_the_choices():
    from engine.config import EngineArgs

    EngineArgs(kv_cache_dtype="int8").validate()
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'int8', got 'fp8'.*not implemented"):
        EngineArgs(kv_cache_dtype="fp8").validate()
    with pytest.raises(ValueError, match="got 'int4'"):
        EngineArgs(kv_cache_dtype="int4").validate()
