"""The Triton MoE grouped matmul (engine/kernels/moe_matmul.py) in Triton's interpreter: equal to one
matmul per expert, for uneven expert loads (an expert with no pairs, one with more pairs than a
tile), and the whole expert block of FusedMoE (gate/up, activation, down, weighted sum) equal to
its per-expert CPU path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.moe_matmul import expert_tiles, moe_matmul
from engine.layers.fused_moe import experts_grouped, experts_per_expert, route


def _pairs(tokens: int, experts: int, top_k: int, g: torch.Generator):
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()
    return order // top_k, counts, weights.reshape(-1)[order]


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_matmul_equals_one_matmul_per_expert(tokens):
    g = torch.Generator().manual_seed(tokens)
    experts, k, n = 8, 48, 40  # K and N not multiples of the tiles
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(experts, n, k, generator=g)
    rows, counts, _ = _pairs(tokens, experts, 2, g)
    got = moe_matmul(x, w, rows, counts)
    ref, start = [], 0
    for e, c in enumerate(counts):
        ref.append(x[rows[start:start + c]] @ w[e].T)
        start += c
    torch.testing.assert_close(got, torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_tiles_cover_every_pair_once():
    experts, starts, rows = expert_tiles([0, 3, 20, 0, 16], 16, torch.device("cpu"))
    assert experts.tolist() == [1, 2, 2, 4] and starts.tolist() == [0, 3, 19, 23] and rows.tolist() == [3, 16, 4, 16]


def test_fused_experts_equal_the_per_expert_path():
    g = torch.Generator().manual_seed(0)
    tokens, experts, hidden, inter = 24, 8, 32, 48
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    rows, counts, pw = _pairs(tokens, experts, 2, g)
    act = lambda h: F.silu(h[:, :inter]) * h[:, inter:]  # noqa: E731
    got = experts_grouped(x, rows, counts, pw, w13, w2, act)
    ref = experts_per_expert(x, rows, counts, pw, w13, w2, act)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_disagreeing_shapes_are_an_error():
    with pytest.raises(ValueError, match="do not agree"):
        moe_matmul(torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([0, 1]), [1, 0])
