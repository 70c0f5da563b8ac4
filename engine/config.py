"""Engine configuration: the flat user-facing arguments and the grouped configs built from them."""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from engine.layers.quantization import quantization_methods
from engine.models.hf_config import load_hf_config  # also importable from here (tests, benchmarks)
from engine.pooling.config import resolve_pooler_config
from engine.structured_output.config import StructuredOutputsConfig


class PreemptionMode(str, Enum):
    """How a preempted request gives its KV blocks back. A ``str``, so ``"swap"`` compares equal
    to ``PreemptionMode.SWAP`` and users keep passing plain strings."""

    RECOMPUTE = "recompute"  # drop the blocks; the tokens are recomputed (mostly prefix-cache hits)
    SWAP = "swap"  # copy the blocks to host memory and back

    def __str__(self) -> str:
        return self.value


def _one_of(names: list[str]) -> str:
    """``'a' or 'b'``: how the validation messages list the allowed values."""
    return " or ".join(repr(n) for n in names)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class ModelConfig:
    path: Path
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    architecture: str
    quantization: str | None = None
    gguf_file: Path | None = None  # quantization="gguf": the file whose blocks the layers keep

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def eos_token_ids(self) -> set[int]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    swap_space_bytes: int = 0
    cache_dtype: str = "auto"  # how K/V are stored: the model's dtype, or "int8" (engine/attention/kv_format.py)
    num_blocks: int = 0  # decided at start-up


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"  # a name in engine.scheduler.policy.POLICIES
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    enable_chunked_prefill: bool = True
    # speculative decoding: KV slots past a step's tokens that a draft model writes its proposals'
    # K/V into before the next step (engine/spec_decode/config.py)
    num_lookahead_slots: int = 0
    max_loras: int | None = None  # LoRA: most distinct adapters in one step (None: LoRA off)

    @property
    def preempts_by_swap(self) -> bool:
        """Preemption swaps blocks to host memory (when room is left there)."""
        return self.preemption_mode == PreemptionMode.SWAP


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1  # stages of contiguous layers, one Ray actor (per TP rank) each
    data_parallel_size: int = 1  # engine replicas behind one front end (engine/dp/)
    # a pipeline step's requests in this many groups in flight at once (0: one per stage)
    pipeline_micro_batches: int = 0

    @property
    def world_size(self) -> int:
        """Workers one engine replica runs: tensor x pipeline ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    attention_backend: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    speculative_config: Any = None  # engine.spec_decode.config.SpeculativeConfig once built
    enforce_eager: bool = False  # no CUDA graphs (they are only ever used on CUDA)
    structured_outputs_config: Any = None  # engine.structured_output.config.StructuredOutputsConfig
    lora_config: Any = None  # engine.lora.config.LoRAConfig when enable_lora
    pooler_config: Any = None  # engine.pooling.config.PoolerConfig: how pooling requests pool
    runner: str = "generate"  # "pooling": the model serves only pooling (embedding) requests


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, hf_config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 matmuls are ~100x slower than fp32 on CPUs without AMX: fp32 is the CPU default.
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPES.get(cfg)
        return cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of 'auto', {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class EngineArgs:
    """Every argument `LLM(...)` and `python -m engine serve` accept, with vLLM's names."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    swap_space: float = 0  # GiB of host memory for preemption by swap
    kv_cache_dtype: str = "auto"  # "int8": int8 K/V with a scale per token and head (docs/performance.md)
    preemption_mode: str = "recompute"
    scheduling_policy: str = "fcfs"
    seed: int = 0
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_micro_batches: int = 0  # 0: as many as stages (engine/pipeline/micro_batch.py)
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    quantization: str | None = None
    device: str | None = None
    speculative_config: dict | None = None
    enforce_eager: bool = False
    structured_outputs_config: dict | None = None  # engine/structured_output/config.py
    enable_lora: bool = False  # LoRA adapters per request (docs/lora.md)
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    runner: str = "auto"  # "auto" | "generate" | "pooling" (vLLM's names); task="embed" means pooling
    task: str | None = None
    pooler_config: dict | None = None  # engine/pooling/config.py, when the model has no sentence-transformers config
    override_pooler_config: dict | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def validate(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        modes = [m.value for m in PreemptionMode]
        if self.preemption_mode not in modes:
            raise ValueError(f"preemption_mode must be {_one_of(modes)}, got {self.preemption_mode!r}")
        if self.preemption_mode == PreemptionMode.SWAP and not self.swap_space > 0:
            raise ValueError("preemption_mode='swap' needs swap_space > 0 (GiB of host memory for swapped-out blocks)")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        from engine.attention.kv_format import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            hint = " (fp8 caches are not implemented; int8 halves the bytes of an fp16 cache too)" if str(
                self.kv_cache_dtype).startswith("fp8") else ""
            raise ValueError(f"kv_cache_dtype must be {_one_of(list(KV_CACHE_DTYPES))}, got {self.kv_cache_dtype!r}{hint}")
        # imported here: the engine.scheduler package imports this module when it is imported
        from engine.scheduler.policy import policy_names

        if self.scheduling_policy not in policy_names():
            raise ValueError(f"scheduling_policy must be {_one_of(policy_names())}, got {self.scheduling_policy!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        mb = self.pipeline_micro_batches
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 0:
            raise ValueError(f"pipeline_micro_batches must be an integer >= 0 (0: one per stage), got {mb!r}")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one worker; tensor or pipeline parallelism "
                             "needs 'ray' (or leave it unset)")
        if self.quantization is not None and self.quantization not in quantization_methods():
            raise ValueError(f"quantization must be None or {_one_of(quantization_methods())}, got {self.quantization!r}")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be 'auto', 'generate' or 'pooling', got {self.runner!r}")
        if self.task not in (None, "auto", "generate", "embed"):
            raise ValueError(f"task must be 'generate' or 'embed' (or use runner='pooling'), got {self.task!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def create_engine_config(self) -> EngineConfig:
        from engine.models.default_model import resolve_model_path

        self.validate()
        device = torch.device(self.device) if self.device else default_device()
        from engine.layers.quantization.gguf import resolve_gguf

        quantization, gguf_file = resolve_gguf(self.model, self.quantization)
        path = resolve_model_path(self.model)
        hf_config = load_hf_config(path)
        dtype = resolve_dtype(self.dtype, device, hf_config)
        model_max = getattr(hf_config, "max_position_embeddings", 2048) or 2048
        if self.max_model_len is None:
            max_model_len = model_max
        else:
            if self.max_model_len < 1:
                raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
            max_model_len = self.max_model_len
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max(2048, max_model_len)
        if not self.enable_chunked_prefill and batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_model_len}) "
                "without chunked prefill: long prompts could never run; raise it or enable chunked prefill"
            )
        model = ModelConfig(
            path=path,
            hf_config=hf_config,
            dtype=dtype,
            max_model_len=max_model_len,
            architecture=hf_config.architectures[0],
            quantization=quantization,
            gguf_file=gguf_file,
        )
        cache = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            swap_space_bytes=int(self.swap_space * (1 << 30)),
            cache_dtype=self.kv_cache_dtype,
        )
        speculative = _speculative_config(self.speculative_config, hf_config)
        scheduler = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
            preemption_mode=PreemptionMode(self.preemption_mode),
            enable_chunked_prefill=self.enable_chunked_prefill,
            num_lookahead_slots=speculative.num_lookahead_slots if speculative is not None else 0,
        )
        lora = None
        if self.enable_lora:
            from engine.lora.config import LoRAConfig

            lora = LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)
            scheduler.max_loras = lora.max_loras
        backend = self.distributed_executor_backend
        if backend is None:
            backend = "ray" if self.tensor_parallel_size * self.pipeline_parallel_size > 1 else "uni"
        parallel = ParallelConfig(self.tensor_parallel_size, backend, self.pipeline_parallel_size,
                                  self.data_parallel_size, self.pipeline_micro_batches)
        return EngineConfig(
            model=model,
            cache=cache,
            scheduler=scheduler,
            parallel=parallel,
            device=device,
            attention_backend=self.attention_backend,
            seed=self.seed,
            tokenizer=self.tokenizer,
            speculative_config=speculative,
            enforce_eager=self.enforce_eager,
            structured_outputs_config=StructuredOutputsConfig.from_dict(self.structured_outputs_config),
            lora_config=lora,
            pooler_config=resolve_pooler_config(path, hf_config, self.pooler_config, self.override_pooler_config),
            runner="pooling" if self.runner == "pooling" or self.task == "embed" else "generate",
        )


def _speculative_config(raw: Any, hf_config: Any) -> Any:
    if raw is None:
        return None
    from engine.spec_decode.config import SpeculativeConfig

    return SpeculativeConfig.from_dict(raw, hf_config)
