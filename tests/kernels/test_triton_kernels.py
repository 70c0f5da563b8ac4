"""Each Triton kernel equals its torch reference (engine/kernels/torch_ref.py), run in Triton's CPU
interpreter (see conftest.py). Outputs are poisoned with NaN first, so an element a kernel forgets to
write fails. Shapes stay small: the interpreter costs milliseconds per program iteration."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine.attention.backends.torch_backend import TorchAttentionBackend
from engine.attention.backends.triton_backend import TritonAttentionBackend
from engine.kernels import torch_ref
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import write_kv
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.rotary import rotary_embedding
from engine.kernels.triton_compat import fp32_to_bf16_rtne
from tests.kernels.paged import make_metadata, make_paged_cache

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2e-2, atol=2e-2), F16: dict(rtol=1e-3, atol=1e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(actual).any(), "kernel left elements unwritten (NaN poison survived)"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize(
    "block_size,kvh,d,src_dtype,cache_dtype",
    [(16, 3, 64, F32, F32), (32, 2, 128, BF16, BF16), (16, 4, 64, F32, BF16), (32, 1, 128, F16, F16)],
)
def test_write_kv_matches_reference_and_skips_padding(block_size, kvh, d, src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(block_size * 7 + d)
    num_blocks, t = 6, 11
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[[2, 5, 10]] = -1  # padded tokens
    key = torch.randn((t, kvh, d), generator=gen).to(src_dtype)
    value = torch.randn((t, kvh, d), generator=gen).to(src_dtype)
    k0 = torch.randn((num_blocks, block_size, kvh, d), generator=gen).to(cache_dtype)
    v0 = torch.randn((num_blocks, block_size, kvh, d), generator=gen).to(cache_dtype)
    k_ref, v_ref, k_out, v_out = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    torch_ref.write_kv(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_out, v_out, slots)
    # a copy (with the reference's cast): bit-exact, and every other slot untouched
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert not torch.equal(k_out, k0)


# ---------------------------------------------------------------- decode

DECODE_CASES = [
    # block_size, head_dim, heads, kv_heads, seq_lens, dtype, num_splits
    (16, 64, 4, 4, [1, 17, 64], F32, 1),  # MHA, single-token context, mid-block and full-block ends
    (32, 128, 9, 3, [1, 40, 200], F32, 1),  # GQA group 3 (padded and masked)
    (16, 128, 8, 2, [5, 96, 33], F32, 3),  # group 4, split context; a 5-token request leaves splits empty
    (32, 64, 9, 3, [300, 7], BF16, 4),
    (16, 64, 8, 2, [130, 1, 64], BF16, 1),
    (32, 128, 4, 4, [77], F16, 2),
]


def _decode_case(block_size, d, h, kvh, seq_lens, dtype, num_splits, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(seq_lens) + d + h)
    cache = make_paged_cache(seq_lens, block_size, kvh, d, dtype, gen)
    query = torch.randn((len(seq_lens), h, d), generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(d)
    expected = torch_ref.paged_decode_attention(
        query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale
    )
    out = nan_like(query)
    got = paged_decode_attention(
        query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale,
        max_seq_len=max(seq_lens), num_splits=num_splits, out=out,
    )
    assert got is out
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("block_size,d,h,kvh,seq_lens,dtype,num_splits", DECODE_CASES)
def test_paged_decode_matches_reference(block_size, d, h, kvh, seq_lens, dtype, num_splits):
    _decode_case(block_size, d, h, kvh, seq_lens, dtype, num_splits)


def test_paged_decode_random_shapes():
    """Seeded random draws over the same axes (incl. the default split choice), returning a new tensor."""
    rng = random.Random(1234)
    for i in range(4):
        block_size, d = rng.choice([16, 32]), rng.choice([64, 128])
        kvh, group = rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
        seq_lens = [rng.randint(1, 160) for _ in range(rng.randint(1, 3))]
        dtype = rng.choice([F32, BF16])
        gen = torch.Generator().manual_seed(i)
        cache = make_paged_cache(seq_lens, block_size, kvh, d, dtype, gen)
        query = torch.randn((len(seq_lens), kvh * group, d), generator=gen).to(dtype)
        expected = torch_ref.paged_decode_attention(
            query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, 0.1
        )
        for splits in (None, rng.choice([2, 3])):
            got = paged_decode_attention(
                query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, 0.1, num_splits=splits
            )
            assert_close(got, expected, dtype)


def test_paged_decode_scale_is_applied():
    gen = torch.Generator().manual_seed(5)
    cache = make_paged_cache([50, 9], 16, 2, 64, F32, gen)
    query = torch.randn((2, 4, 64), generator=gen)
    outs = []
    for scale in (0.05, 0.5):
        expected = torch_ref.paged_decode_attention(
            query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale
        )
        got = paged_decode_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, scale)
        assert_close(got, expected, F32)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


# ---------------------------------------------------------------- prefill

PREFILL_CASES = [
    # block_size, head_dim, heads, kv_heads, seq_lens, query_lens, dtype
    (16, 64, 4, 4, [1, 17, 70], [1, 17, 70], F32),  # plain prefills (no cached context)
    (32, 128, 9, 3, [150, 37, 64], [70, 5, 64], F32),  # chunked: contexts 80 and 32 end mid-block
    (16, 128, 8, 2, [200, 3], [33, 1], BF16),  # one span much shorter than the other
    (32, 64, 6, 2, [45, 129], [45, 66], F16),
]


def _spans(query_lens: list[int]) -> list[int]:
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    return qsl


@pytest.mark.parametrize("block_size,d,h,kvh,seq_lens,query_lens,dtype", PREFILL_CASES)
def test_paged_prefill_matches_reference(block_size, d, h, kvh, seq_lens, query_lens, dtype):
    gen = torch.Generator().manual_seed(sum(seq_lens) + d)
    cache = make_paged_cache(seq_lens, block_size, kvh, d, dtype, gen)
    qsl = _spans(query_lens)
    query = torch.randn((qsl[-1], h, d), generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(d)
    expected = torch_ref.paged_prefill_attention(
        query, cache.k_cache, cache.v_cache, cache.block_tables, qsl, seq_lens, scale
    )
    out = nan_like(query)
    got = paged_prefill_attention(
        query, cache.k_cache, cache.v_cache, cache.block_tables, torch.tensor(qsl, dtype=torch.int32),
        cache.seq_lens, scale, max_query_len=max(query_lens), out=out,
    )
    assert_close(got, expected, dtype)


def test_paged_prefill_host_lists_return_new_tensor():
    gen = torch.Generator().manual_seed(3)
    seq_lens, query_lens = [40, 90], [40, 20]
    cache = make_paged_cache(seq_lens, 16, 3, 64, F32, gen)
    qsl = _spans(query_lens)
    query = torch.randn((qsl[-1], 6, 64), generator=gen)
    expected = torch_ref.paged_prefill_attention(
        query, cache.k_cache, cache.v_cache, cache.block_tables, qsl, seq_lens, 0.2
    )
    got = paged_prefill_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, qsl, seq_lens, 0.2)
    assert_close(got, expected, F32)


# ---------------------------------------------------------------- backend (write, then decode + prefill)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_triton_backend_matches_torch_backend(dtype):
    """A mixed step: 2 decodes, a chunked prefill and a fresh prefill, plus 2 padded tokens (slot -1).
    The new tokens' K/V arrive through ``key``/``value`` and must be written before attending."""
    gen = torch.Generator().manual_seed(11)
    block_size, h, kvh, d = 16, 9, 3, 64
    seq_lens, query_lens, pad = [33, 1, 100, 20], [1, 1, 36, 20], 2
    cache = make_paged_cache(seq_lens, block_size, kvh, d, dtype, gen)
    meta = make_metadata(cache, query_lens, num_decodes=2, pad_tokens=pad)
    t = sum(query_lens) + pad
    query = torch.randn((t, h, d), generator=gen).to(dtype)
    key = torch.randn((t, kvh, d), generator=gen).to(dtype)
    value = torch.randn((t, kvh, d), generator=gen).to(dtype)
    k_ref, v_ref = cache.k_cache.clone(), cache.v_cache.clone()
    expected = TorchAttentionBackend().forward(query, key, value, k_ref, v_ref, meta, 0.125)
    k_got, v_got = cache.k_cache.clone(), cache.v_cache.clone()
    got = TritonAttentionBackend().forward(query, key, value, k_got, v_got, meta, 0.125)
    n = sum(query_lens)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    assert_close(got[:n], expected[:n], dtype)
    assert torch.equal(got[n:], torch.zeros_like(got[n:]))  # padded rows are defined, not garbage


# ---------------------------------------------------------------- RMSNorm and rotary


@pytest.mark.parametrize("dtype,hidden", [(F32, 576), (BF16, 576), (F16, 128), (F32, 64)])
def test_rms_norm_matches_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn((2, 3, hidden), generator=gen).to(dtype)
    residual = torch.randn((2, 3, hidden), generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    x0, r0 = x.clone(), residual.clone()

    got = rms_norm(x, weight, 1e-6, out=nan_like(x))
    assert_close(got, torch_ref.rms_norm(x, weight, 1e-6), dtype)

    exp_normed, exp_res = torch_ref.rms_norm(x, weight, 1e-6, residual)
    normed, res = rms_norm(x, weight, 1e-6, residual, out=nan_like(x), residual_out=nan_like(x))
    assert_close(normed, exp_normed, dtype)
    assert torch.equal(res, exp_res)  # x + residual rounds exactly like torch
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # inputs untouched

    # in place: out aliases x, residual_out aliases residual
    rms_norm(x, weight, 1e-6, residual, out=x, residual_out=residual)
    assert_close(x, exp_normed, dtype)
    assert torch.equal(residual, exp_res)


def test_rms_norm_fp32_weight_on_bf16_input_promotes_like_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 96), generator=gen).to(BF16)
    weight = torch.rand(96, generator=gen) + 0.5
    expected = torch_ref.rms_norm(x, weight, 1e-5)
    got = rms_norm(x, weight, 1e-5)
    assert got.dtype == expected.dtype == F32
    assert_close(got, expected, F32)


def _cos_sin_cache(max_pos: int, d: int) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("dtype,h,kvh,d", [(F32, 9, 3, 64), (BF16, 8, 2, 128), (F16, 4, 4, 64)])
def test_rotary_in_place_on_fused_qkv_views(dtype, h, kvh, d):
    """q and k are strided views into one fused qkv buffer, as the attention layer produces them; the
    kernel must rotate them in place and leave the v columns alone."""
    gen = torch.Generator().manual_seed(d + h)
    t = 7
    qkv = torch.randn((t, (h + 2 * kvh) * d), generator=gen).to(dtype)
    cache = _cos_sin_cache(300, d)
    positions = torch.randint(0, 300, (t,), generator=gen)
    ref = qkv.clone()
    q_ref, k_ref = ref[:, : h * d].view(t, h, d), ref[:, h * d : (h + kvh) * d].view(t, kvh, d)
    torch_ref.rotary_embedding(positions, q_ref, k_ref, cache)
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    v_before = qkv[:, (h + kvh) * d :].clone()
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    assert q_out is q and k_out is k
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(qkv[:, (h + kvh) * d :], v_before)


# ---------------------------------------------------------------- interpreter fixes


def test_interpreter_bf16_cast_rounds_to_nearest_even():
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5e-3, 3.4e38, float("inf"), float("nan"), 0.1])
    got = torch.from_numpy(fp32_to_bf16_rtne(x.numpy()).view("int16")).view(BF16)
    assert torch.equal(got[:5], x[:5].to(BF16)) and torch.isnan(got[5]) and got[6] == x[6].to(BF16)


# ---------------------------------------------------------------- end to end through the engine


def test_engine_greedy_tokens_identical_with_triton_and_torch_backends(tmp_path, default_model_path):
    """The real model runner's metadata driving the Triton backend: a GQA model (3 q heads over 1 kv head,
    head dim 64), block size 16, and a token budget of 24 so long prompts are chunked and share steps with
    decodes. Greedy tokens must equal the torch backend's."""
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(
        tmp_path / "gqa", default_model_path, hidden_size=192, num_heads=3, num_kv_heads=1, intermediate_size=256,
        tie_word_embeddings=True,
    )
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 40000) for _ in range(n)]} for n in (5, 41, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(path), attention_backend=backend, block_size=16, max_num_batched_tokens=24,
            num_gpu_blocks_override=32, enable_prefix_caching=False, seed=0,
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert [len(t) for t in tokens["triton"]] == [6, 6, 6]
    assert tokens["triton"] == tokens["torch"]
