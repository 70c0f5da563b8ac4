"""The inverse-CDF draw (engine/sample/draw.py): tokens of zero weight are never drawn, not even at
the extreme uniforms, frequencies follow the weights, and a seeded row spends one number per draw."""
from __future__ import annotations

import pytest
import torch

from engine.sample import draw
from engine.sample.draw import random_sample, uniform


def test_frequencies_follow_unnormalised_weights():
    torch.manual_seed(0)
    w = torch.tensor([[0.0, 3.0, 0.0, 1.0, 6.0, 0.0]]).expand(20000, 6).contiguous()
    counts = torch.bincount(random_sample(w, {}), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = torch.tensor([3.0, 1.0, 6.0], dtype=torch.float64) / 10 * 20000
    chi2 = float(((counts[[1, 3, 4]] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # chi-square with 2 degrees of freedom: p = 0.001


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53])
def test_extreme_uniforms_land_on_a_token_with_weight(monkeypatch, u):
    """u = 0 must skip leading zero weights; the largest u must not run past the last nonzero one."""
    monkeypatch.setattr(draw, "uniform", lambda gen, rows, device: torch.full((rows, 1), u, dtype=torch.float64))
    w = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.0, 0.0], [0.0, 0.1, 0.0, 0.0, 0.0, 0.9]])
    got = random_sample(w, {}).tolist()
    assert got == ([2, 1] if u == 0.0 else [3, 5])


def test_an_all_zero_row_returns_an_index_in_range():
    assert random_sample(torch.zeros(2, 5), {}).tolist() == [4, 4]


def test_seeded_rows_spend_one_uniform_per_draw_and_ignore_the_batch():
    w = torch.rand(3, 1000)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = random_sample(w, {1: g1})[1]
    alone = random_sample(w[1:2], {0: g2})[0]
    assert first == alone
    # each draw spent exactly one uniform: the next number of each generator is the seed's second
    second = uniform(torch.Generator().manual_seed(5), 2, torch.device("cpu"))[1].item()
    assert uniform(g1, 1, torch.device("cpu")).item() == second
    assert uniform(g2, 1, torch.device("cpu")).item() == second
