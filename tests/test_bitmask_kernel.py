"""The C grammar-bitmask kernel (engine/kernels/cpu/bitmask_cpu.c) equals xgrammar's own apply:
random masks with whole-zero, whole-one and mixed words, a vocabulary that ends inside a word, and
a subset of the rows (the constrained ones of a batch)."""
from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from engine.kernels.cpu import bitmask_ops


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_equals_xgrammar_apply(vocab):
    kernel = bitmask_ops.load()
    assert kernel is not None, "the C kernels build on every machine the tests run on (gcc is required)"
    g = torch.Generator().manual_seed(vocab)
    rows, words = 6, (vocab + 31) // 32
    kind = torch.randint(0, 3, (rows, words), generator=g)  # 0: all banned, 1: all allowed, 2: mixed
    mixed = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    mask = torch.where(kind == 0, torch.zeros_like(mixed), torch.where(kind == 1, torch.full_like(mixed, -1), mixed))
    logits = torch.randn(rows, vocab, generator=g)
    subset = [0, 2, 5]
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, mask, vocab_size=vocab, indices=subset)
    got = logits.clone()
    kernel.apply(got, mask, subset, subset)
    assert torch.equal(got, ref)
    assert torch.equal(got[[1, 3, 4]], logits[[1, 3, 4]])  # rows not listed are untouched


def test_rejects_what_it_cannot_read():
    kernel = bitmask_ops.load()
    with pytest.raises(ValueError, match="fp32"):
        kernel.apply(torch.zeros(1, 64, dtype=torch.float16), torch.zeros(1, 2, dtype=torch.int32), [0], [0])
