"""EngineClient: everything the OpenAI server asks of an engine.

The server holds an EngineClient, never the engine's internals (its scheduler, executor or
config); AsyncLLMEngine implements it. Another engine (a remote one, a test double) can serve the
same routes by implementing these members; DPAsyncEngine (engine/dp/client.py) serves N
data-parallel replicas this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from engine.core.input_processor import InputProcessor, ProcessedInput, PromptType
from engine.core.request_metrics import EngineMetrics
from engine.core.stats import EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """add_request refused: the engine's waiting queue holds ``queued`` sequences, its cap
    (``max_num_queued_requests``) is ``limit``. The server answers 429 with Retry-After."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"the server's queue is full ({queued} requests waiting, the limit is {limit}); "
                         "retry shortly")
        self.queued = queued
        self.limit = limit


@dataclass(frozen=True)
class ModelInfo:
    """What clients need to know about the served model. The served names are the server's
    (``--served-model-name``), not the engine's."""

    model_path: str  # the checkpoint directory the engine loaded
    max_model_len: int  # the longest sequence (prompt + output): the configured length, capped by the KV cache
    vocab_size: int


@runtime_checkable
class OutputStream(Protocol):
    """The outputs of one request, in order; the last one has ``finished`` set."""

    request_id: str
    finished: bool

    async def get(self) -> RequestOutput: ...

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_config(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer. It is in use on the engine thread: a caller on another thread
        should load its own (HF fast tokenizers must not be shared across threads)."""

    def get_tokenizer(self) -> Any: ...

    @property
    def input_processor(self) -> InputProcessor:
        """The engine's request checks; ``with_tokenizer`` gives a copy for another thread."""

    def check_lora(self, lora_request: Any) -> None:
        """LoRAError for an adapter the engine cannot serve (bad path, rank, shapes, targets)."""

    def lora_users(self, lora_int_id: int) -> list[str]:
        """Ids of the unfinished requests that use an adapter."""

    @property
    def errored(self) -> bool:
        """True once the engine failed; it then takes no more requests."""

    metrics: EngineMetrics  # request outcomes and latency histograms, for /metrics

    def start(self) -> None:
        """Starts the engine loop (on the running event loop); add_request starts it too."""

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fails requests in flight, stops the engine (waiting at most ``timeout`` s for it).
        (Optional member, not part of the protocol: ``num_queued_requests() -> int``, the sequences
        waiting to be scheduled, exported to /metrics when present.)"""

    async def add_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedInput,
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
        priority: int = 0,
        arrival_time: float | None = None,
        check_queue: bool = True,
    ) -> OutputStream:
        """Queues a request and returns once the engine took it; bad input raises ValueError here,
        a full waiting queue QueueFullError (when ``check_queue``; a request's later prompts pass
        False so that one request is admitted whole or not at all).
        With ``stream`` the stream yields a delta every step, without it only the final output."""

    def generate(
        self, prompt: PromptType | ProcessedInput, params: SamplingParams | None, request_id: str, *,
        stream: bool = True, priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """add_request, then its outputs; leaving the iteration early aborts the request."""

    def abort(self, request_ids: str | list[str]) -> None: ...

    def release_kv(self, request_ids: list[str]) -> None:
        """Frees the blocks finished ``retain_kv`` requests kept for their continuations (beam
        search); applied between steps."""

    def get_stats(self) -> EngineStats:
        """The engine's stats as of its last step (cheap; any thread)."""

    async def check_health(self) -> dict | None:
        """Raises (EngineDeadError) unless the engine and its workers are alive. May return a report
        for /health's body (a data-parallel engine: ``{"status": "degraded", "replicas": [...]}``)."""
