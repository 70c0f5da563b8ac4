"""Sliding windows and soft-capping in every attention kernel: the torch reference against a dense
brute force, then the Triton kernels (interpreter) and the C decode kernel against the reference;
end to end, the Triton backend's prefill logits and greedy tokens against transformers."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import torch_ref
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.prefill_attention import paged_prefill_attention
from tests.kernels.paged import make_paged_cache

F32 = torch.float32
# window, softcap; window 1 sees only the token itself, 0 disables
VARIANTS = [(5, 0.0), (16, 0.0), (1, 0.0), (0, 1.5), (7, 2.0)]


def dense(q, k, v, qpos, scale, window, softcap):
    """[Tq, H, D] queries at positions ``qpos`` over the keys 0..L-1 of one request, by the definition."""
    h, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, 1)
    v = v.repeat_interleave(h // kvh, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(k.shape[0])
    visible = kpos[None, :] <= qpos[:, None]
    if window > 0:
        visible &= kpos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.double()).float()


def _context(cache, i, n):
    return torch_ref.gather_kv(cache.k_cache, cache.block_tables[i], n), torch_ref.gather_kv(
        cache.v_cache, cache.block_tables[i], n)


@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_decode_window_and_softcap(window, softcap):
    gen = torch.Generator().manual_seed(window * 10 + int(softcap))
    seq_lens = [3, 40, 70]
    cache = make_paged_cache(seq_lens, 16, 2, 32, F32, gen)
    query = torch.randn((3, 4, 32), generator=gen)
    want = torch.cat([dense(query[i : i + 1], *_context(cache, i, n), torch.tensor([n - 1]), 0.2, window, softcap)
                      for i, n in enumerate(seq_lens)])
    ref = torch_ref.paged_decode_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens,
                                           0.2, window=window, softcap=softcap)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    for splits in (1, 2):
        got = paged_decode_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, 0.2,
                                     num_splits=splits, window=window, softcap=softcap)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from engine.kernels.cpu.ops import load

    kernels = load()
    if kernels is not None:
        out = torch.empty_like(query)
        kernels.paged_decode_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, cache.seq_lens, 0.2,
                                       out, window, softcap)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_prefill_window_and_softcap(window, softcap):
    """A plain prefill and a chunk over cached context, in one call."""
    gen = torch.Generator().manual_seed(window + 100)
    seq_lens, query_lens = [37, 80], [37, 21]
    cache = make_paged_cache(seq_lens, 16, 2, 32, F32, gen)
    qsl = [0, 37, 58]
    query = torch.randn((58, 4, 32), generator=gen)
    want = torch.cat([dense(query[qsl[i] : qsl[i + 1]], *_context(cache, i, n), torch.arange(n - q, n), 0.2, window,
                            softcap) for i, (n, q) in enumerate(zip(seq_lens, query_lens))])
    ref = torch_ref.paged_prefill_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, qsl, seq_lens,
                                            0.2, window=window, softcap=softcap)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    got = paged_prefill_attention(query, cache.k_cache, cache.v_cache, cache.block_tables, qsl, seq_lens, 0.2,
                                  window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gemma2_path(tmp_path_factory, default_model_path):
    from tests.models.tiny import family_configs, save_tiny

    return save_tiny(family_configs()["gemma2"], tmp_path_factory.mktemp("gemma2-triton"), default_model_path)


def test_triton_backend_gemma2_matches_transformers(gemma2_path):
    """Windowed and soft-capped layers through the Triton kernels: prefill logits, then greedy tokens
    with chunked prefills sharing steps with decodes."""
    from engine import LLM, SamplingParams
    from tests.conftest import assert_greedy_match
    from tests.models.tiny import engine_prefill_logits, hf_greedy, hf_logits, prompt_ids

    ids = prompt_ids(1)[0]
    err = (engine_prefill_logits(gemma2_path, ids, "triton") - hf_logits(gemma2_path, ids)).abs().max().item()
    assert err < 1e-4
    prompts = prompt_ids(2)
    ref = hf_greedy(gemma2_path, prompts, 6)
    llm = LLM(str(gemma2_path), attention_backend="triton", max_num_batched_tokens=24, num_gpu_blocks_override=16,
              max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for i, out in enumerate(outs):
        assert_greedy_match(list(out.outputs[0].token_ids), ref[i], label=f"triton gemma2 prompt {i}")
    llm.shutdown()
