"""Pipeline stages in one process (no Ray): layer ranges, what each stage holds and reads, and
greedy tokens through 2 and 4 chained stages equal to the whole model's. The Ray executor runs the
same stages as actors (tests/test_ray_multinode.py)."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.errors import EngineStartupError, UnsupportedModelError
from engine.executor.base import Executor
from engine.pipeline.micro_batch import merge_outputs, split_step
from engine.pipeline.partition import stage_layer_range
from engine.pipeline.stage_runner import stage_weight_bytes
from engine.pipeline.worker import PipelineWorker
from tests.conftest import make_tiny_llama

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    ", "List three prime numbers"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


class LocalPipelineExecutor(Executor):
    """Every stage in this process, chained by hand: what PipelineRayExecutor does over Ray."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.workers = [PipelineWorker(config, rank=r) for r in range(config.parallel.pipeline_parallel_size)]

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def execute_model(self, so):
        outs = []  # the micro-batches in order, each through every stage (each actor's order on Ray)
        for group in split_step(so, self.config.parallel.pipeline_micro_batches or len(self.workers)):
            out = None
            for w in self.workers:
                out = w.execute_stage(group, out)
            outs.append(out)
        return merge_outputs(outs)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, default_model_path):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4"), default_model_path, num_layers=4, seed=3)


def test_layer_ranges_and_divisibility():
    assert [(r.start, r.end) for r in (stage_layer_range(30, 3, s) for s in range(3))] == [(0, 10), (10, 20), (20, 30)]
    with pytest.raises(UnsupportedModelError, match=r"pipeline_parallel_size=4 does not divide the model's 30 layers.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        stage_layer_range(30, 4, 0)
    with pytest.raises(UnsupportedModelError, match="pipeline_parallel_size=3 does not divide"):
        stage_layer_range(2, 3, 0)


@pytest.mark.parametrize("fixture, sizes", [("tiny4", (2, 4)), ("default_model_path", (2,))])
def test_chained_stages_equal_the_whole_model(fixture, sizes, request, monkeypatch):
    """The tiny 4-layer model (untied) in 2 and 4 stages; SmolLM2 (30 layers, tied embeddings: the
    last stage keeps the embedding as its LM head) in 2."""
    path = str(request.getfixturevalue(fixture))
    ref = LLM(path, num_gpu_blocks_override=64)
    want = [list(o.outputs[0].token_ids) for o in ref.generate(PROMPTS, GREEDY, use_tqdm=False)]
    full_bytes = ref.llm_engine.executor.collective_rpc("weight_bytes")[0]
    num_layers = ref.llm_engine.config.model.num_layers
    ref.shutdown()
    monkeypatch.setattr("engine.core.llm_engine.make_executor", LocalPipelineExecutor)
    for pp in sizes:  # (micro-batches: one per stage, the default; pp=2 also in 3, more than it has stages)
        llm = LLM(path, pipeline_parallel_size=pp, num_gpu_blocks_override=64, pipeline_micro_batches=3 if pp == 2 else 0)
        ex = llm.llm_engine.executor
        got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert got == want, f"pp={pp}"
        # each stage holds its layers and KV cache only; together about the whole model
        stage_bytes = ex.collective_rpc("weight_bytes")
        assert all(b < full_bytes for b in stage_bytes)
        layers = [len(w.runner.attention_layers()) for w in ex.workers]
        assert layers == [num_layers // pp] * pp and len(ex.workers[0].runner.kv_caches) == num_layers // pp
        # the start-up memory check's estimate (from the checkpoint's headers) is what a stage holds
        estimate = [stage_weight_bytes(w.rng, llm.llm_engine.config.model, 1) for w in ex.workers]
        assert estimate == stage_bytes
        if fixture == "tiny4":  # untied: each matrix lives on exactly one stage
            assert sum(stage_bytes) == full_bytes
        else:  # tied: the embedding is on both ends (the first stage's input, the last one's LM head)
            embed = ref.llm_engine.config.model.vocab_size * 576 * 4
            assert sum(stage_bytes) == full_bytes + embed and max(stage_bytes) < 0.65 * full_bytes
        stages = ex.collective_rpc("stage_timing")
        assert [s for s, _, _ in stages] == list(range(pp)) and all(n > 0 for _, _, n in stages)
        # a prompt-logprobs request runs through the last stage's full-model path too
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, prompt_logprobs=1, temperature=0), use_tqdm=False)
        assert len(out[0].prompt_logprobs) == len(out[0].prompt_token_ids)
        llm.shutdown()


def test_features_stages_cannot_run_fail_at_start(tiny4):
    from engine.config import EngineArgs
    from engine.pipeline.worker import check_pipeline_config

    cfg = EngineArgs(model=str(tiny4), pipeline_parallel_size=2, enable_lora=True).create_engine_config()
    with pytest.raises(UnsupportedModelError, match="LoRA adapters does not run with pipeline_parallel_size=2"):
        check_pipeline_config(cfg)
    cfg = EngineArgs(model=str(tiny4), pipeline_parallel_size=3).create_engine_config()
    with pytest.raises(UnsupportedModelError, match=r"does not divide the model's 4 layers.*\[1, 2, 4\]"):
        check_pipeline_config(cfg)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be an integer >= 1"):
        EngineArgs(model=str(tiny4), pipeline_parallel_size=0).validate()
    with pytest.raises(ValueError, match="distributed_executor_backend='uni' runs one worker"):
        EngineArgs(model=str(tiny4), pipeline_parallel_size=2, distributed_executor_backend="uni").validate()


def test_a_node_that_cannot_hold_its_stage_fails_before_loading(tiny4, monkeypatch):
    monkeypatch.setattr("engine.core.llm_engine.make_executor", LocalPipelineExecutor)
    monkeypatch.setenv("PAGED_ENGINE_STAGE_MEMORY_BYTES", str(1 << 20))
    with pytest.raises(EngineStartupError, match=r"pipeline stage 0 \(layers 0-1\) needs about \d+ MiB for its weights, "
                       r"but .* has 1 MiB free; use more pipeline stages"):
        LLM(str(tiny4), pipeline_parallel_size=2, num_gpu_blocks_override=64)
