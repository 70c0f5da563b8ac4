"""The CPU KV cache's zero tensors (engine/worker/lazy_zeros.py): zero, writable, alive as long as
the tensor is, and resident only where written."""
from __future__ import annotations

import gc

import pytest
import torch

from engine.worker.lazy_zeros import lazy_zeros


def test_zero_writable_and_kept_alive_by_the_tensor():
    t = lazy_zeros((64, 16, 3, 64), torch.float32)
    assert t.is_contiguous() and t.data_ptr() % 4096 == 0 and t.shape == (64, 16, 3, 64)
    gc.collect()  # the mapping must outlive every other reference to it
    assert torch.count_nonzero(t) == 0
    t[3, 5] = 7.0
    assert float(t.sum()) == 7.0 * 3 * 64
    assert lazy_zeros((0, 4), torch.float32).shape == (0, 4)


def test_only_written_pages_become_resident():
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    before = proc.memory_info().rss
    t = lazy_zeros((1 << 28,), torch.float32)  # 1 GiB
    assert proc.memory_info().rss - before < 64 << 20
    t[: 1 << 22] = 1.0  # 16 MiB written
    grown = proc.memory_info().rss - before
    assert 16 << 20 <= grown < 96 << 20, grown
