"""Decode steps replayed as kernel plans on CPU (engine/worker/cpu_graph.py): the same tokens as the
eager engine, plans recorded per bucket on first use, and a bucket whose pass is not all C kernels
refused by the check and run eagerly."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from engine.worker.cpu_graph import CpuGraphRunner

PROMPTS = [{"prompt_token_ids": list(range(3 + i, 20 + 3 * i))} for i in range(19)]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _generate(path, counts=(1, 3, 19), **kwargs):
    from engine.entrypoints.llm import LLM

    llm = LLM(str(path), dtype="float32", max_num_seqs=32, num_gpu_blocks_override=256, **kwargs)
    runner = llm.llm_engine.executor.worker.runner
    out = {n: [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:n], PARAMS, use_tqdm=False)] for n in counts}
    return out, runner.graph_runner, llm


@pytest.mark.parametrize("quantization,kv_cache_dtype", [(None, "auto"), ("int8", "auto"), (None, "int8")])
def test_plans_give_the_eager_tokens(tiny_model_path, quantization, kv_cache_dtype):
    eager, none, _ = _generate(tiny_model_path, enforce_eager=True, quantization=quantization,
                               kv_cache_dtype=kv_cache_dtype)
    assert none is None
    planned, runner, llm = _generate(tiny_model_path, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    assert isinstance(runner, CpuGraphRunner)
    assert runner.num_replays > 0
    recorded = {size for size, plan in runner.plans.items() if plan is not None}
    assert {1, 3, 20} <= recorded  # 19 requests pad to the bucket of 20, finished ones shrink the batch
    assert planned == eager
    kv = llm.llm_engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks  # every block returned


def test_a_pass_with_torch_ops_in_it_is_refused(tiny_model_path, monkeypatch):
    from engine.layers.quantization import base

    eager, _, _ = _generate(tiny_model_path, counts=(3, 1), enforce_eager=True)
    import torch.nn.functional as F

    apply = base.UnquantizedLinearMethod.apply

    def torch_past_two_rows(self, layer, x):  # three rows: torch's GEMM, which no plan records
        return F.linear(x, layer.weight, getattr(layer, "bias", None)) if x.shape[0] > 2 else apply(self, layer, x)

    monkeypatch.setattr(base.UnquantizedLinearMethod, "apply", torch_past_two_rows)
    got, runner, _ = _generate(tiny_model_path, counts=(3, 1))
    assert runner.plans.get(3, "missing") is None  # recorded, checked, refused
    assert runner.plans.get(1) is not None  # one row is all C kernels
    assert got == eager


def test_plans_of_all_sizes_share_one_set_of_activations(tiny_model_path):
    _, runner, _ = _generate(tiny_model_path)
    plans = [p for p in runner.plans.values() if p is not None]
    assert len(plans) >= 3
    pointers = [{t.untyped_storage().data_ptr() for t in p.plan._keep} for p in plans]
    shared = set.intersection(*pointers)
    assert len(shared) > 10  # the layers' outputs live in the arena, whatever the bucket
