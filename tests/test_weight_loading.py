"""Weight loading under tensor parallelism reads only each rank's slice of the checkpoint."""
from __future__ import annotations

import pytest
import torch

from engine.config import load_hf_config
from engine.distributed.parallel_state import set_tp_group
from engine.layers.checkpoint import CheckpointSlice, materialize
from engine.models import loader


@pytest.fixture(autouse=True)
def _reset_tp_group():
    yield
    set_tp_group(0, 1)


def _load(path, rank: int, tp: int, monkeypatch) -> tuple[torch.nn.Module, int, int]:
    """Loads the tiny model as ``rank`` of ``tp`` and counts the bytes its loaders read."""
    slices: list[CheckpointSlice] = []
    real = loader.CheckpointSlice

    def counting(source, dtype):
        s = real(source, dtype)
        slices.append(s)
        return s

    monkeypatch.setattr(loader, "CheckpointSlice", counting)
    set_tp_group(rank, tp)
    hf_config = load_hf_config(path)
    model = loader.build_model(hf_config, torch.float32, torch.device("cpu"))
    loader.load_weights(model, path, show_progress=False)
    full = sum(s.shape.numel() * 4 for s in slices)
    return model, sum(s.bytes_read for s in slices), full


def test_each_rank_reads_only_its_slice(tiny_model_path, monkeypatch):
    ref, read1, full = _load(tiny_model_path, 0, 1, monkeypatch)
    assert read1 == full  # one rank reads everything once
    ref_params = dict(ref.named_parameters())
    total = 0
    for rank in range(2):
        model, read, _ = _load(tiny_model_path, rank, 2, monkeypatch)
        total += read
        assert read < 0.6 * full, f"rank {rank} read {read} of {full} bytes"
        # what it kept is exactly its part of the unsharded weights (the gate/up halves of rank r)
        gate_up = dict(model.named_parameters())["model.layers.0.mlp.gate_up_proj.weight"]
        full_gu = ref_params["model.layers.0.mlp.gate_up_proj.weight"]
        inter = full_gu.shape[0] // 2
        half = inter // 2
        expect = torch.cat([full_gu[rank * half:(rank + 1) * half], full_gu[inter + rank * half:inter + (rank + 1) * half]])
        assert torch.equal(gate_up, expect)
    assert total <= full * 1.2  # replicated norms are read by both ranks; nothing else is


def test_checkpoint_slice_reads_rows_and_columns(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    w = torch.arange(24, dtype=torch.float32).view(4, 6)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        s = CheckpointSlice(f.get_slice("w"), torch.float64)
        assert s.shape == (4, 6) and s.dim() == 2
        assert torch.equal(s.narrow(1, 2, 3), w[:, 2:5].double())
        assert torch.equal(s[1:3], w[1:3].double())
        assert torch.equal(s[3:10], w[3:].double())  # clamped like a tensor slice
        assert torch.equal(materialize(s), w.double())
        assert s.bytes_read == (12 + 12 + 6 + 24) * 8
        with pytest.raises(TypeError, match="contiguous row slices"):
            s[::2]
