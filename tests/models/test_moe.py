"""FusedMoE: routing as each family normalises it, and a decode step at batch 1 reads only the
chosen experts' weights."""
from __future__ import annotations

import torch

from engine.layers.fused_moe import FusedMoE, route


def test_route_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    w, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, probs[:, :2])
    w, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1))


def test_batch1_decode_reads_only_active_experts(family_paths):
    """Through the engine's loader: one token through the tiny Mixtral (8 experts, top 2) reads
    2/8 of each layer's expert weights, the dense floor of its active parameters."""
    from tests.models.tiny import engine_prefill_logits

    path = family_paths("mixtral")
    seen: list[FusedMoE] = []
    original = FusedMoE.forward

    def spy(self, x, logits):
        seen.append(self)
        return original(self, x, logits)

    FusedMoE.forward = spy
    try:
        engine_prefill_logits(path, [17], "torch")
    finally:
        FusedMoE.forward = original
    assert len(seen) == 2  # one MoE block per layer
    for moe in seen:
        per_expert = (moe.w13_weight[0].numel() + moe.w2_weight[0].numel()) * 4
        assert moe.expert_bytes_read == moe.top_k * per_expert
        all_experts = (moe.w13_weight.numel() + moe.w2_weight.numel()) * 4
        assert moe.expert_bytes_read * moe.num_experts == all_experts * moe.top_k


def test_experts_shard_like_a_dense_mlp(monkeypatch):
    """Each rank loads its slice of every expert's checkpoint tensors; the ranks' partial outputs
    (the all-reduce simulated by a sum) equal the unsharded layer's."""
    from types import SimpleNamespace

    from engine.distributed import parallel_state

    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=24, hidden_act="silu")
    experts, inter = 4, 16
    ckpt = {(e, part): torch.randn(inter, 24) if part != "down" else torch.randn(24, inter)
            for e in range(experts) for part in ("gate", "up", "down")}
    x, logits = torch.randn(5, 24), torch.randn(5, experts)
    monkeypatch.setattr(parallel_state.TPGroup, "all_reduce", lambda self, t: t)
    outs = []
    try:
        for rank, size in ((0, 1), (0, 2), (1, 2)):
            parallel_state.set_tp_group(rank, size)
            moe = FusedMoE(config, experts, 2, inter, renormalize=True)
            for (e, part), w in ckpt.items():
                param = moe.w2_weight if part == "down" else moe.w13_weight
                moe.weight_loader(param, w, (e, part))
            outs.append(moe(x, logits))
    finally:
        parallel_state.set_tp_group(0, 1)
    torch.testing.assert_close(outs[1] + outs[2], outs[0], rtol=1e-5, atol=1e-5)
