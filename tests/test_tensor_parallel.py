"""Sharding without Ray: every rank's slice, built by the real layers' weight loaders in this process,
recombines into the unsharded computation (the all-reduce is simulated by a sum over ranks)."""
from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.distributed.head_layout import tp_head_layout
from engine.distributed.parallel_state import create_store, set_tp_group
from engine.errors import EngineStartupError
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


@pytest.fixture(autouse=True)
def _reset_tp_group():
    yield
    set_tp_group(0, 1)


def _rank_attention(x, wq, wk, wv, wo, heads, kv_heads, tp, rank, d):
    """This rank's partial o_proj output, through the real QKV and row-parallel loaders."""
    set_tp_group(rank, tp)
    hidden = x.shape[-1]
    qkv = QKVParallelLinear(hidden, d, heads, kv_heads)
    o = RowParallelLinear(heads * d, hidden, input_heads=qkv.layout.q_heads, head_dim=d)
    for shard, w in (("q", wq), ("k", wk), ("v", wv)):
        qkv.weight_loader(qkv.weight, w, shard)
    o.weight_loader(o.weight, wo)
    nh, nkv = qkv.num_heads, qkv.num_kv_heads
    assert nh % nkv == 0, "local grouping must be uniform"
    q, k, v = F.linear(x, qkv.weight).split([nh * d, nkv * d, nkv * d], dim=-1)
    q = q.view(-1, nh, d).transpose(0, 1)
    k = k.view(-1, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)  # the backends' grouping
    v = v.view(-1, nkv, d).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(x.shape[0], -1)
    return F.linear(attn, o.weight), qkv


def _full_attention(x, wq, wk, wv, wo, heads, kv_heads, d):
    q = F.linear(x, wq).view(-1, heads, d).transpose(0, 1)
    k = F.linear(x, wk).view(-1, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = F.linear(x, wv).view(-1, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(x.shape[0], -1)
    return F.linear(attn, wo)


@pytest.mark.parametrize(
    "heads,kv_heads,tp",
    [(9, 3, 2), (9, 3, 4), (9, 3, 3), (9, 1, 2), (8, 2, 4), (8, 2, 8), (4, 4, 2), (12, 4, 8), (6, 3, 4), (9, 3, 1)],
)
def test_sharded_attention_equals_unsharded(heads, kv_heads, tp):
    torch.manual_seed(heads * 100 + kv_heads * 10 + tp)
    d, hidden, tokens = 8, 24, 5
    x = torch.randn(tokens, hidden)
    wq, wk, wv = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    wo = torch.randn(hidden, heads * d)
    want = _full_attention(x, wq, wk, wv, wo, heads, kv_heads, d)
    parts = [_rank_attention(x, wq, wk, wv, wo, heads, kv_heads, tp, r, d)[0] for r in range(tp)]
    torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-4)


def test_smollm2_layout_pads_a_kv_group_on_rank_1():
    """9 query / 3 KV heads on 2 ranks: 12/4 after padding, each rank 6 query heads over 2 KV heads."""
    r0, r1 = tp_head_layout(9, 3, 2, 0), tp_head_layout(9, 3, 2, 1)
    assert r0.q_heads == (0, 1, 2, 3, 4, 5) and r0.kv_heads == (0, 1)
    assert r1.q_heads == (6, 7, 8, None, None, None) and r1.kv_heads == (2, None)
    # replication: 1 KV head on 2 ranks, 9 query heads padded to 10
    assert tp_head_layout(9, 1, 2, 0).q_heads == (0, 1, 2, 3, 4)
    assert tp_head_layout(9, 1, 2, 1).q_heads == (5, 6, 7, 8, None) and tp_head_layout(9, 1, 2, 1).kv_heads == (0,)


@settings(max_examples=300, deadline=None)
@given(kv=st.integers(1, 12), group=st.integers(1, 8), tp=st.integers(1, 8))
def test_layout_invariants(kv, group, tp):
    heads = kv * group
    layouts = [tp_head_layout(heads, kv, tp, r) for r in range(tp)]
    # every rank has the same shape (the same kernels, the same cache layout)
    assert len({(lay.num_heads, lay.num_kv_heads) for lay in layouts}) == 1
    real_q = [h for lay in layouts for h in lay.q_heads if h is not None]
    assert sorted(real_q) == list(range(heads)), "each query head is computed exactly once"
    for lay in layouts:
        g = lay.num_heads // lay.num_kv_heads
        assert lay.num_heads == g * lay.num_kv_heads
        for j, h in enumerate(lay.q_heads):
            if h is not None:  # the standard local grouping reads the right KV head
                assert lay.kv_heads[j // g] == h // group
    if tp == 1:
        assert layouts[0].is_contiguous and layouts[0].num_heads == heads
    if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0) and (kv % tp == 0 or group % (tp // kv) == 0):
        assert layouts[0].num_heads == heads // tp, "no padding when everything divides"


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tp_head_layout(9, 2, 2, 0)
    with pytest.raises(ValueError, match="outside the tensor-parallel group"):
        tp_head_layout(8, 2, 2, 2)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mlp_shards_sum_to_unsharded(tp):
    torch.manual_seed(tp)
    hidden, inter = 16, 32
    x = torch.randn(3, hidden)
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    want = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    total = 0
    for r in range(tp):
        set_tp_group(r, tp)
        gu = MergedColumnParallelLinear(hidden, [inter, inter])
        gu.weight_loader(gu.weight, gate, 0)
        gu.weight_loader(gu.weight, up, 1)
        dn = RowParallelLinear(inter, hidden)
        dn.weight_loader(dn.weight, down)
        assert gu.weight.shape == (2 * inter // tp, hidden) and dn.weight.shape == (hidden, inter // tp)
        g, u = F.linear(x, gu.weight).chunk(2, dim=-1)
        total = total + F.linear(F.silu(g) * u, dn.weight)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-4)


def test_row_parallel_bias_added_once():
    bias = torch.arange(4.0)
    got = []
    for r in range(2):
        set_tp_group(r, 2)
        layer = RowParallelLinear(8, 4, bias=True)
        layer.weight_loader(layer.bias, bias)
        got.append(layer.bias.clone())
    torch.testing.assert_close(got[0] + got[1], bias)


@pytest.mark.parametrize("vocab,tp", [(50, 2), (49, 2), (49, 3)])
def test_vocab_parallel_embedding_and_lm_head(vocab, tp):
    torch.manual_seed(vocab)
    hidden = 8
    w = torch.randn(vocab, hidden)
    ids = torch.tensor([0, vocab - 1, vocab // 2, 3])
    h = torch.randn(2, hidden)
    emb, logits = 0, []
    for r in range(tp):
        set_tp_group(r, tp)
        e = VocabParallelEmbedding(vocab, hidden)
        e.weight_loader(e.weight, w)
        local = ids - e.start
        mask = (local >= 0) & (local < e.shard_size)  # what forward masks before its all-reduce
        emb = emb + F.embedding(local.clamp(0, e.shard_size - 1), e.weight) * mask.unsqueeze(-1)
        head = ParallelLMHead(vocab, hidden)
        head.weight_loader(head.weight, w)
        assert head.weight.shape[0] == -(-vocab // tp), "each rank keeps only its rows"
        logits.append(F.linear(h, head.weight))
    torch.testing.assert_close(emb, w[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], F.linear(h, w))


def test_tp1_layers_are_plain():
    set_tp_group(0, 1)
    qkv = QKVParallelLinear(16, 4, 6, 2)
    assert qkv.layout.is_contiguous and qkv.weight.shape == ((6 + 4) * 4, 16)
    o = RowParallelLinear(24, 16, input_heads=qkv.layout.q_heads, head_dim=4)
    w = torch.randn(16, 24)
    o.weight_loader(o.weight, w)
    torch.testing.assert_close(o.weight, w)


def test_taken_port_is_a_clear_startup_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(EngineStartupError, match=f"could not listen on port {port}"):
            create_store(f"tcp://127.0.0.1:{port}", 0, 2)
        assert time.monotonic() - t0 < 10


def test_rendezvous_port_zero_binds_a_free_port():
    store = create_store("tcp://127.0.0.1:0", 0, 2)
    assert store.port > 0
    store.set("k", "v")
    assert store.get("k") == b"v"
