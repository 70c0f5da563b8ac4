"""The C prefill attention kernel (fp32_cpu.c, ``f32_paged_prefill_attention``): against a float64
reference over fp32 and int8 caches (GQA groups of 1 to 5, spans after cached context, sliding
windows, soft-capping) in every ISA build, and a row's bits independent of how the prompt was
chunked, which tile it fell in and what else was in the batch."""
from __future__ import annotations

import pytest
import torch

from engine.attention.kv_format import Int8KVFormat
from engine.kernels import torch_ref
from engine.kernels.cpu import ops
from tests.isa_builds import isa_builds
from tests.kernels.paged import make_paged_cache

INT8 = Int8KVFormat(torch.float32)
BUILDS = isa_builds(ops.load(), lambda march: ops.CpuFp32Kernels(ops.build(ops.SOURCE, march)))


def _starts(query_lens: list[int]) -> list[int]:
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return qsl


def _run(kernels, query, cache_k, cache_v, tables, seq_lens, query_lens, window=0, softcap=0.0) -> torch.Tensor:
    out = torch.empty_like(query)
    kernels.paged_prefill_attention(query, cache_k, cache_v, tables, torch.tensor(seq_lens, dtype=torch.int32),
                                    torch.tensor(_starts(query_lens), dtype=torch.int32), 0.125, out, window, softcap)
    return out


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (45, 0.0), (0, 20.0)])
def test_matches_a_float64_reference(int8, window, softcap):
    gen = torch.Generator().manual_seed(7 + window + int(softcap) + int8)
    for seq_lens, query_lens, h, kvh, d in (([70, 30, 300], [25, 30, 140], 6, 2, 32), ([100, 17], [100, 5], 9, 3, 64),
                                            ([40], [40], 5, 1, 128), ([33, 65], [1, 64], 4, 4, 64)):
        cache = make_paged_cache(seq_lens, 16, kvh, d, torch.float32, gen)
        k, v, load = cache.k_cache, cache.v_cache, (lambda r: r.double())
        if int8:
            nb, bs = k.shape[:2]
            k = INT8.store(k.flatten(0, 1)).view(nb, bs, kvh, d + 4)
            v = INT8.store(v.flatten(0, 1)).view(nb, bs, kvh, d + 4)
            load = lambda r: INT8.load(r).double()  # noqa: E731
        query = torch.randn(sum(query_lens), h, d, generator=gen)
        ref = torch_ref.paged_prefill_attention(query.double(), k, v, cache.block_tables, _starts(query_lens),
                                                seq_lens, 0.125, window=window, softcap=softcap, load=load)
        for name, kernels in BUILDS.items():
            got = _run(kernels, query, k, v, cache.block_tables, seq_lens, query_lens, window, softcap)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("window", [0, 50])
def test_a_rows_bits_do_not_depend_on_chunking_tiles_or_the_batch(window):
    """One 200-token prompt as one span, as spans of 37 + 163 and 150 + 50 (the second after cached
    context), and next to other requests: every query row has the same bits."""
    gen = torch.Generator().manual_seed(11)
    h, kvh, d = 9, 3, 64
    cache = make_paged_cache([200, 90], 16, kvh, d, torch.float32, gen)
    query = torch.randn(200, h, d, generator=gen)
    kernels = BUILDS["native"]
    table = cache.block_tables[:1]
    whole = _run(kernels, query, cache.k_cache, cache.v_cache, table, [200], [200], window)
    for first in (37, 150):
        head = _run(kernels, query[:first], cache.k_cache, cache.v_cache, table, [first], [first], window)
        tail = _run(kernels, query[first:], cache.k_cache, cache.v_cache, table, [200], [200 - first], window)
        assert torch.equal(torch.cat([head, tail]), whole), first
    other = torch.randn(30, h, d, generator=gen)
    batched = _run(kernels, torch.cat([other, query]), cache.k_cache, cache.v_cache, cache.block_tables.flip(0),
                   [90, 200], [30, 200], window)
    assert torch.equal(batched[30:], whole)
