"""The synchronous engine: tokenizes, schedules, executes and turns results into outputs."""
from __future__ import annotations

import copy
import itertools
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.config import EngineArgs, EngineConfig
from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.input_processor import InputProcessor, ProcessedInput, PromptType
from engine.core.output_processor import OutputProcessor, ParentState, SampleState, child_id
from engine.core.startup import STARTUP
from engine.core.stats import EngineStats
from engine.executor.base import make_executor
from engine.lora.registry import LoRARegistry
from engine.outputs import RequestOutput
from engine.pooling.params import PoolingParams
from engine.pooling.requests import make_pooling_request
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.scheduler import Scheduler
from engine.structured_output.manager import make_structured_output_manager

logger = logging.getLogger(__name__)


# tokenizer classes that load from tokenizer.json alone: named in tokenizer_config.json, they are what
# AutoTokenizer returns, and loading them directly skips its config lookup (1.5 s of transformers'
# config classes at start-up)
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(config: EngineConfig) -> Any:
    import json

    path = Path(config.tokenizer or config.model.path)
    try:
        name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    if name in GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        import transformers

        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        STARTUP.mark("config")
        self.tokenizer = load_tokenizer(config)
        STARTUP.mark("tokenizer")
        self.eos_token_ids = frozenset(config.model.eos_token_ids() | ({self.tokenizer.eos_token_id} - {None}))
        self.executor = make_executor(config)
        try:
            self.executor.load_model()
            STARTUP.mark("workers and weights")
            num_blocks = self.executor.determine_num_blocks()
        except BaseException:
            self.executor.shutdown()  # stop Ray workers that did start
            raise
        bs = config.cache.block_size
        if num_blocks < 1:
            raise ValueError(
                "the KV cache budget holds no block; raise kv_cache_memory_bytes or set num_gpu_blocks_override"
            )
        config.cache.num_blocks = num_blocks
        self.executor.init_cache(num_blocks)
        STARTUP.mark("KV cache")
        per_block = self.executor.kv_bytes_per_block()
        logger.info(
            "KV cache (%s): %d blocks of %d tokens = %d tokens (%.1f MiB, %.1f KiB per block)", config.cache.cache_dtype,
            num_blocks, bs, num_blocks * bs, num_blocks * per_block / 2**20, per_block / 2**10,
        )
        if num_blocks * bs < config.model.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len=%d: longer sequences stop early",
                num_blocks * bs, config.model.max_model_len,
            )
        num_host_blocks = 0
        if config.scheduler.preempts_by_swap:
            num_host_blocks = config.cache.swap_space_bytes // per_block
            self.executor.init_swap_space(num_host_blocks)
            logger.info("swap space: %d host blocks (%.1f MiB)", num_host_blocks, num_host_blocks * per_block / 2**20)
        self.kv_cache = KVCacheManager(num_blocks, bs, config.cache.enable_prefix_caching, num_host_blocks)
        # grammars live here, in the engine process: compiles, matchers, each step's bitmask
        self.structured_output = make_structured_output_manager(config, lambda: load_tokenizer(config),
                                                                self.eos_token_ids)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.structured_output)
        self.output_processor = OutputProcessor(self.tokenizer, config.pooler_config)
        self.lora_registry = LoRARegistry(config.lora_config, config.model.hf_config)  # adapters checked here
        self._ids = itertools.count()
        self.num_generation_tokens = 0
        STARTUP.mark("scheduler and structured outputs")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ---- requests --------------------------------------------------------------------------
    @cached_property
    def input_processor(self) -> InputProcessor:
        """Tokenizes and checks requests (built on first use, from the finished engine)."""
        return InputProcessor(self.tokenizer, self.config.model.vocab_size, self.eos_token_ids,
                              self.scheduler.check_prompt, structured_output=self.structured_output,
                              pooler_config=self.config.pooler_config, runner=self.config.runner)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.input_processor.tokenize_prompt(prompt)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType | ProcessedInput,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        delta: bool = False,
        lora_request: Any = None,
    ) -> str:
        """Validates and queues a request; raises ValueError (or a subclass) for bad input.

        A ProcessedInput (from ``input_processor.process``, as the server makes) is queued as it is,
        with its own params; ``params`` must then be None. ``lora_request`` (engine.lora.LoRARequest,
        or the one a ProcessedInput carries) picks the adapter; a bad one raises LoRAError.
        """
        if request_id is None:
            request_id = str(next(self._ids))
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, ProcessedInput):
            if params is not None:
                raise TypeError("a ProcessedInput carries its own SamplingParams; pass params=None")
            inputs = prompt
        else:
            inputs = self.input_processor.process(prompt, params)
        inputs = self.lora_registry.attach(inputs, lora_request, request_id)
        arrival = arrival_time if arrival_time is not None else time.time()
        if isinstance(inputs.params, PoolingParams):  # one request, prefill only: engine/pooling/
            children = [make_pooling_request(request_id, inputs, arrival, priority, self.config.pooler_config)]
            parent = ParentState(request_id, inputs.prompt, inputs.prompt_token_ids, [SampleState(0, None)],
                                 pooling_params=inputs.params)
        else:
            children = self._fan_out(request_id, inputs, arrival, priority)
            samples = [
                SampleState(c.sample_index, IncrementalDetokenizer(self.tokenizer, inputs.prompt_token_ids,
                                                                   c.sampling_params))
                for c in children
            ]
            parent = ParentState(request_id, inputs.prompt, inputs.prompt_token_ids, samples, delta=delta,
                                 num_prompt_logprobs=inputs.params.prompt_logprobs)
        self.output_processor.add(parent, [c.request_id for c in children])
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def _fan_out(self, request_id: str, inputs: ProcessedInput, arrival: float, priority: int) -> list[Request]:
        """One Request per sample. With n > 1 each sample gets n=1, its own seed (seed + i) when
        seeded, and only the first scores the prompt (prompt_logprobs)."""
        params, n = inputs.params, inputs.params.n
        children = []
        # shallow copies: the samples share the stop strings, token-id lists and logit_bias of one
        # params object; only n, the seed and (after the first) prompt_logprobs differ
        rest = None
        if n > 1:
            rest = copy.copy(params)
            rest.n, rest.prompt_logprobs = 1, None
        for i in range(n):
            child_params = params if n == 1 else rest
            if n > 1 and (i == 0 or params.seed is not None):
                child_params = copy.copy(rest)
                child_params.prompt_logprobs = params.prompt_logprobs if i == 0 else None
                if params.seed is not None:
                    child_params.seed = params.seed + i
            children.append(
                Request(
                    request_id=child_id(request_id, i, n),
                    prompt_token_ids=inputs.prompt_token_ids,
                    sampling_params=child_params,
                    arrival_time=arrival,
                    prompt=inputs.prompt,
                    eos_token_ids=self.eos_token_ids,
                    priority=priority,
                    parent_id=request_id,
                    sample_index=i,
                    lora_request=inputs.lora_request,
                    kv_source=inputs.kv_source if n == 1 else None,
                    retain_kv=inputs.retain_kv and n == 1,
                )
            )
        return children

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Aborts user-facing requests (all their samples) wherever they are; frees their blocks."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for pid in request_ids:
            parent = self.output_processor.parents.get(pid)
            if parent is None:
                continue
            n = len(parent.samples)
            for i in range(n):
                for req in self.scheduler.finish_requests(child_id(pid, i, n), RequestStatus.FINISHED_ABORTED):
                    self.output_processor.finish(req)
            outputs.append(self.output_processor.make_output(pid))
        return outputs

    def release_kv(self, request_ids: list[str]) -> None:
        """Beam search has queued every continuation of these finished requests (added with
        ``retain_kv``): their kept blocks go back (engine/scheduler/retained_kv.py)."""
        self.scheduler.release_kv(list(request_ids))

    # ---- stepping --------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step and returns an output for every request that progressed."""
        so = self.scheduler.schedule()
        # requests the scheduler ended without running them (a grammar that failed to compile)
        updated, self.scheduler.rejected = [(req, []) for req in self.scheduler.rejected], []
        logprobs: dict = {}
        if so.needs_workers:
            result = self.executor.execute_model(so)
            if not so.is_empty:  # else only block copies or dropped states this step
                logprobs = dict(zip(result.req_ids, result.logprobs)) if result.logprobs else {}
                for rid, (first, entries) in getattr(result, "prompt_logprobs", {}).items():
                    self.output_processor.add_prompt_logprobs(rid, first, entries)
                self.output_processor.add_pooler_outputs(result.pooler_output)
                updated += self.scheduler.update_from_output(so, result.sampled_token_ids, result.draft_token_ids)
        touched: dict[str, None] = {}
        for req, new in updated:
            self.num_generation_tokens += len(new)
            lps = logprobs.get(req.request_id)
            stop = self.output_processor.process(req, new, lps[: len(new)] if lps else None)
            if stop is not None:
                if not req.is_finished:
                    self.scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.status = RequestStatus.FINISHED_STOPPED  # a stop string beats a length limit hit at once
                req.stop_reason = stop
            if req.is_finished:
                self.output_processor.finish(req)
            touched[self.output_processor.child_to_parent[req.request_id][0]] = None
        return [self.output_processor.make_output(pid) for pid in touched]

    def get_stats(self) -> EngineStats:
        """A snapshot of the engine's state; later steps do not change it."""
        sched = self.scheduler
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_swapped=sched.num_swapped,
            prompt_tokens_total=sched.stats.num_prefill_tokens,
            generation_tokens_total=self.num_generation_tokens,
            scheduler=sched.stats.snapshot(),
            kv_cache=self.kv_cache.get_stats(),
            spec_decoding=sched.spec_stats.snapshot(),
            structured_output=self.structured_output.get_stats(),
        )

    @property
    def max_model_len(self) -> int:
        """The longest sequence that can run: max_model_len, or less where the KV cache is smaller."""
        return self.scheduler.max_model_len

    def check_prompt(self, num_tokens: int) -> None:
        """PromptTooLongError when a prompt of ``num_tokens`` cannot run (callers that build requests
        themselves, such as beam search, check before they start)."""
        self.scheduler.check_prompt(num_tokens)

    def check_lora(self, lora_request: Any) -> None:
        """LoRAError (a 400) for an adapter this engine cannot serve; checked adapters are cached."""
        self.lora_registry.check(lora_request)

    def lora_users(self, lora_int_id: int) -> list[str]:
        """Ids of unfinished requests using an adapter (safe from another thread)."""
        return self.lora_registry.users(lora_int_id, self.output_processor.parents.__contains__)

    def record_decode_plans(self, num_reqs: int) -> list[int]:
        """Records the decode replays of up to ``num_reqs`` requests now (a server's start-up)."""
        return self.executor.record_decode_plans(num_reqs)

    def check_health(self) -> None:
        """Raises if a worker is gone (Ray: a worker that died while idle, with no call into it)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.structured_output.shutdown()
