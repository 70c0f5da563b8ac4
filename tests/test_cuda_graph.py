"""Decode CUDA graphs: the bucketing and static-buffer logic everywhere, capture and replay on a GPU.

Without CUDA the graph tests are skipped with the reason; the CPU tests also check the engine never
tries to capture on CPU."""
from __future__ import annotations

import pytest
import torch

from engine.worker.cuda_graph import CUDAGraphRunner, StaticDecodeInputs, bucket_for, capture_sizes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs capture GPU kernels: no CUDA device")


def test_capture_sizes_and_buckets():
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and capture_sizes(256)[-1] == 256
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = capture_sizes(40)
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 33, 40)] == [1, 4, 8, 16, 40, 40]
    assert bucket_for(41, sizes) is None


def test_static_inputs_fill_pads_rows_to_write_nowhere():
    buf = StaticDecodeInputs.allocate(max_bs=8, max_blocks=6, device=torch.device("cpu"))
    buf.fill(5, 8, torch.arange(5) + 100, torch.arange(5) + 7, torch.arange(5) * 16, torch.full((5,), 9, dtype=torch.int32),
             torch.ones((5, 2), dtype=torch.int32) * 3)
    # a smaller step afterwards must not leave the previous step's rows live
    buf.fill(2, 4, torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6]), torch.tensor([7, 8], dtype=torch.int32),
             torch.tensor([[1], [2]], dtype=torch.int32))
    assert buf.input_ids[:4].tolist() == [1, 2, 0, 0]
    assert buf.slot_mapping[:4].tolist() == [5, 6, -1, -1]
    assert buf.seq_lens[:4].tolist() == [7, 8, 1, 1]
    assert buf.block_tables[:4, 0].tolist() == [1, 2, 0, 0]
    meta = buf.metadata(4, block_size=16, max_model_len=128)
    assert meta.num_decodes == meta.num_requests == 4 and meta.max_decode_seq_len == 128
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def test_graph_runner_refuses_cpu():
    with pytest.raises(ValueError, match="need a CUDA device"):
        CUDAGraphRunner(torch.nn.Identity(), 8, 128, 16, torch.device("cpu"))


def test_cpu_engine_never_uses_cuda_graphs(tiny_model_path):
    from engine.entrypoints.llm import LLM

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=64)
    assert not isinstance(llm.llm_engine.executor.worker.runner.graph_runner, CUDAGraphRunner)
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=64, enforce_eager=True)
    assert llm.llm_engine.executor.worker.runner.graph_runner is None


@needs_cuda
@pytest.mark.slow
def test_graph_replay_matches_eager_on_gpu(tiny_model_path):
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": list(range(3 + i, 20 + 3 * i))} for i in range(19)]  # buckets 1..32
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model_path), dtype="float32", enforce_eager=eager, max_num_seqs=32)
        runner = llm.llm_engine.executor.worker.runner
        for n in (1, 3, 19):
            results[(eager, n)] = [o.outputs[0].token_ids for o in llm.generate(prompts[:n], params, use_tqdm=False)]
        if not eager:
            assert runner.graph_runner is not None and runner.graph_runner.num_replays > 0
        llm.shutdown()
    for n in (1, 3, 19):
        assert results[(False, n)] == results[(True, n)]


def test_dummy_prefill_of_the_largest_step_runs_and_leaves_the_cache_alone(tiny_model_path):
    """The memory-profiling step (run on GPUs before sizing the KV cache) on CPU: it must not touch
    the real cache nor leave the scratch one bound."""
    from engine.entrypoints.llm import LLM

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=16, max_num_batched_tokens=256)
    runner = llm.llm_engine.executor.worker.runner
    caches = [(a.k_cache, a.v_cache) for a in runner.attention_layers()]
    before = [k.clone() for k, _ in caches]
    runner.run_dummy_prefill(256, 8)
    assert [(a.k_cache, a.v_cache) for a in runner.attention_layers()] == caches
    assert all(torch.equal(k, b) for (k, _), b in zip(caches, before))
