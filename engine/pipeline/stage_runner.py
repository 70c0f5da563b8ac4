"""The model runner of one pipeline stage.

Every stage keeps the same request states and block tables (each holds the KV cache of its own
layers, with the block ids the one scheduler hands out) and applies the same block copies; the
scheduled tokens' positions and attention metadata are built on each stage from the same
SchedulerOutput. Only the last stage samples; the earlier ones return the Intermediate their last
layer produced, which the executor passes to the next stage.

Decode-step replay (CUDA graphs, CPU kernel plans) records the whole model's pass and is off for
stages; so are speculative decoding, LoRA and pooling (start-up errors, engine/pipeline/worker.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from engine.attention.metadata import attention_context
from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineStartupError
from engine.pipeline.partition import LayerRange
from engine.pipeline.stage_model import Intermediate, PipelineStageModel
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunner, ModelRunnerOutput


class PipelineStageRunner(ModelRunner):
    def __init__(self, config: EngineConfig, device: torch.device, rng: LayerRange) -> None:
        super().__init__(replace(config, enforce_eager=True), device)
        self.rng = rng
        self._received: Intermediate | None = None
        self.busy_s = 0.0  # time spent computing steps (the benchmark's bubble measure)
        self.num_steps = 0

    def load_model(self, show_progress: bool = True) -> None:
        from engine.attention.backends.selector import get_attention_backend
        from engine.models.loader import load_model

        mc = self.model_config
        check_stage_fits(self.rng, mc, self.config.parallel.tensor_parallel_size, self.device)
        lm = load_model(mc.hf_config, mc.path, mc.dtype, self.device, show_progress, mc.quantization,
                        gguf_file=mc.gguf_file, layer_range=self.rng)
        self.model = PipelineStageModel(lm, self.rng)
        self.attn_backend = get_attention_backend(self.config.attention_backend, self.device, self.kv_format)

    def _forward(self, input_ids, positions, meta, so, lora_ctx=None) -> torch.Tensor:
        """(The last stage, inside ModelRunner.execute.) The layers of this stage on what it received."""
        with attention_context(meta):
            return self.model(input_ids, positions, self._received)

    @torch.inference_mode()
    def execute_stage(self, so: SchedulerOutput, received: Intermediate | None) -> Intermediate | ModelRunnerOutput | None:
        """The last stage: the step's ModelRunnerOutput; the others: the Intermediate for the next
        (None when nothing was scheduled)."""
        t0 = time.perf_counter()
        try:
            if self.rng.is_last:
                self._received = received
                return self.execute(so)
            self._update_states(so)
            self._apply_block_ops(so)
            if so.is_empty:
                return None
            input_ids, positions, meta, _ = self._prepare(so)
            with attention_context(meta):
                return self.model(input_ids, positions, received)
        finally:
            self._received = None
            self.busy_s += time.perf_counter() - t0
            self.num_steps += 1


def stage_weight_bytes(rng: LayerRange, mc: ModelConfig, tp_size: int) -> int:
    """About how many bytes of weights a stage's rank will hold: the checkpoint tensors the stage
    owns (their shapes, read from the safetensors headers, not their data), in the model's dtype,
    split over the stage's tensor-parallel ranks."""
    from safetensors import safe_open

    tied = bool(getattr(mc.hf_config, "tie_word_embeddings", False))
    elem = torch.empty((), dtype=mc.dtype).element_size()
    total = 0
    for f in sorted(mc.path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                if rng.owns(name, tied):
                    numel = 1
                    for d in handle.get_slice(name).get_shape():
                        numel *= d
                    total += numel * elem
    return total // tp_size


def free_memory_bytes(device: torch.device) -> int:
    """Memory this stage's weights can take on its node (PAGED_ENGINE_STAGE_MEMORY_BYTES overrides)."""
    if "PAGED_ENGINE_STAGE_MEMORY_BYTES" in os.environ:
        return int(os.environ["PAGED_ENGINE_STAGE_MEMORY_BYTES"])
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_stage_fits(rng: LayerRange, mc: ModelConfig, tp_size: int, device: torch.device) -> None:
    """EngineStartupError, before any weight is read, when the node cannot hold the stage's weights."""
    if mc.quantization is not None:  # quantized layers hold less than the checkpoint's dtype says
        return
    need, free = stage_weight_bytes(rng, mc, tp_size), free_memory_bytes(device)
    if need > free:
        import socket

        raise EngineStartupError(
            f"pipeline stage {rng.stage} (layers {rng.start}-{rng.end - 1}) needs about {need / 2**20:.0f} MiB for its "
            f"weights, but {socket.gethostname()} has {free / 2**20:.0f} MiB free; use more pipeline stages, tensor "
            "parallelism within each stage, or nodes with more memory"
        )
