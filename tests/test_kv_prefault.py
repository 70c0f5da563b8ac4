"""The KV cache's pages faulted in while cores idle (engine/worker/kv_prefault.py): resident after
the pass, contents untouched (also blocks written during the pass), no cache kept alive by it, and
started by the engine for its CPU cache."""
from __future__ import annotations

import ctypes
import gc

import torch

from engine.worker.kv_prefault import KVPrefaulter, start_prefault
from engine.worker.lazy_zeros import lazy_zeros

_libc = ctypes.CDLL(None, use_errno=True)


def _resident_pages(t: torch.Tensor) -> tuple[int, int]:
    """(resident, total) 4 KiB pages of a page-aligned tensor, from mincore (RSS lags on VMs)."""
    nbytes = t.numel() * t.element_size()
    vec = (ctypes.c_ubyte * ((nbytes + 4095) // 4096))()
    if _libc.mincore(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(nbytes), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec), len(vec)


def test_the_pass_makes_every_block_resident_and_changes_nothing():
    k = lazy_zeros((512, 16, 3, 64), torch.float32)  # 48 MiB each
    v = lazy_zeros((512, 16, 3, 64), torch.float32)
    k[7] = 1.5
    v[300, 3] = -2.0
    assert _resident_pages(k)[0] <= 4 and _resident_pages(v)[0] <= 2
    pf = KVPrefaulter([k, v])
    pf.start()
    for b in range(0, 512, 37):  # the engine writing blocks while the pass runs
        k[b, 0, 0, 0] = float(b)
    assert pf.join(60)
    assert pf.error is None and pf.blocks_done == 512
    for t in (k, v):
        resident, total = _resident_pages(t)
        assert resident == total == 512 * 3
    expect_k = torch.zeros_like(k)
    expect_k[7] = 1.5
    for b in range(0, 512, 37):
        expect_k[b, 0, 0, 0] = float(b)
    assert torch.equal(k, expect_k)
    assert float(v.abs().sum()) == 2.0 * 3 * 64 and float(v[300, 3].sum()) == -2.0 * 3 * 64


def test_a_dropped_cache_ends_the_pass_and_is_freed():
    t = lazy_zeros((4096, 16, 3, 64), torch.int8)  # 12 MiB
    pf = KVPrefaulter([t])
    pf.stop()  # asked to stop before it starts: does nothing
    pf.start()
    assert pf.join(10) and pf.blocks_done == 0
    pf = KVPrefaulter([t])
    del t
    gc.collect()
    pf.start()
    assert pf.join(10) and pf.blocks_done == 0


def test_the_engine_prefaults_its_cpu_cache(tiny_model_path, monkeypatch):
    from engine.entrypoints.llm import LLM

    monkeypatch.setenv("ENGINE_KV_PREFAULT", "1")  # conftest turns it off for the rest of the suite
    llm = LLM(str(tiny_model_path), dtype="float32", num_gpu_blocks_override=256)
    pf = llm.llm_engine.executor.worker.runner.kv_prefault
    assert pf is not None and pf.num_blocks == 256
    assert pf.join(60) and pf.blocks_done == 256 and pf.error is None
    for k, v in llm.llm_engine.executor.worker.runner.kv_caches:
        assert _resident_pages(k)[0] == _resident_pages(k)[1]
    llm.llm_engine.shutdown()
    monkeypatch.setenv("ENGINE_KV_PREFAULT", "0")
    assert start_prefault([lazy_zeros((8, 16), torch.float32)]) is None
