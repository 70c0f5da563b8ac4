"""The LoRA delta's GPU path (engine/lora/ops.py add_lora_triton: shrink and expand as the Triton
grouped matmul) in Triton's interpreter, against the row-by-row definition, for mixed batches with
base rows, uneven groups, slots that are not consecutive and one adapter on every row. (The kernel's
sm_90 compile check is the moe_matmul case of test_compile_sm90.py.)"""
from __future__ import annotations

import pytest
import torch

from engine.lora.ops import LoRABatch, add_lora_triton, lora_reference


@pytest.mark.parametrize("slot_of_row", [
    [0, -1, 2, 0, 1, -1, 2, 2, 0],
    [1] * 5,
    [2, -1, 0, 0, 2, 2, 2, -1, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # a group of more than one 16-row tile
    [-1, -1, 1],
])
def test_triton_shrink_expand_equals_row_by_row(slot_of_row):
    gen = torch.Generator().manual_seed(len(slot_of_row))
    slots, n_r, d_in, d_out = 3, 12, 40, 72  # not multiples of the tiles
    a = torch.randn(slots, n_r, d_in, generator=gen)
    b = torch.randn(slots, d_out, n_r, generator=gen)
    x = torch.randn(len(slot_of_row), d_in, generator=gen)
    base = torch.randn(len(slot_of_row), d_out, generator=gen)
    batch = LoRABatch.build(slot_of_row, torch.device("cpu"))
    got = add_lora_triton(base.clone(), x, a, b, batch)
    torch.testing.assert_close(got, base + lora_reference(x, a, b, slot_of_row), rtol=1e-4, atol=1e-4)
