"""The synchronous engine: tokenizes, schedules, executes and turns results into outputs."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict
from typing import Any

from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.config import EngineArgs, EngineConfig
from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.output_processor import OutputProcessor, ParentState, SampleState, child_id
from engine.executor.base import make_executor
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler.scheduler import Scheduler
from engine.spec_decode.stats import SpecDecodingStats

logger = logging.getLogger(__name__)

PromptType = str | dict | list[int]


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(config.tokenizer or config.model.path))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.eos_token_ids = frozenset(config.model.eos_token_ids() | ({self.tokenizer.eos_token_id} - {None}))
        self.executor = make_executor(config)
        try:
            self.executor.load_model()
            num_blocks = self.executor.determine_num_blocks()
        except BaseException:
            self.executor.shutdown()  # stop Ray workers that did start
            raise
        self.spec_decoder = None  # speculative decoding (engine/spec_decode), with its draft model if any
        if config.speculative_config is not None:
            from engine.spec_decode.manager import SpeculativeDecoder

            self.spec_decoder = SpeculativeDecoder(config.speculative_config, config)
            num_blocks = self.spec_decoder.fit_num_blocks(num_blocks, self.executor.kv_bytes_per_block())
        bs = config.cache.block_size
        if num_blocks < 1:
            raise ValueError(
                "the KV cache budget holds no block; raise kv_cache_memory_bytes or set num_gpu_blocks_override"
            )
        config.cache.num_blocks = num_blocks
        self.executor.init_cache(num_blocks)
        per_block = self.executor.kv_bytes_per_block()
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB, %.1f KiB per block)",
            num_blocks, bs, num_blocks * bs, num_blocks * per_block / 2**20, per_block / 2**10,
        )
        if num_blocks * bs < config.model.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len=%d: longer sequences stop early",
                num_blocks * bs, config.model.max_model_len,
            )
        num_host_blocks = 0
        if config.scheduler.preemption_mode == "swap":
            num_host_blocks = config.cache.swap_space_bytes // per_block
            self.executor.init_swap_space(num_host_blocks)
            logger.info("swap space: %d host blocks (%.1f MiB)", num_host_blocks, num_host_blocks * per_block / 2**20)
        self.kv_cache = KVCacheManager(num_blocks, bs, config.cache.enable_prefix_caching, num_host_blocks)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        if self.spec_decoder is not None:
            self.spec_decoder.bind(self.scheduler, self.kv_cache, num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.num_generation_tokens = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    # ---- requests --------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return prompt.get("prompt"), self._check_ids(ids)
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(list(prompt))
        raise TypeError(f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.config.model.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is out of range [0, {vocab})")
        return list(ids)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        delta: bool = False,
    ) -> str:
        """Validates and queues a request; raises ValueError (or a subclass) for bad input."""
        params = params.clone() if params is not None else SamplingParams()
        params.validate()
        if request_id is None:
            request_id = str(next(self._ids))
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.scheduler.check_prompt(len(ids))
        self._check_params(params)
        params.update_from_tokenizer(self.tokenizer, self.config.model.vocab_size)
        params.update_eos_token_ids(self.eos_token_ids)
        arrival = arrival_time if arrival_time is not None else time.time()
        samples, children = [], []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone()
            if params.n > 1:
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + i
                if i > 0:  # the prompt is scored once, by the first sample
                    child_params.prompt_logprobs = None
            cid = child_id(request_id, i, params.n)
            children.append(
                Request(
                    request_id=cid,
                    prompt_token_ids=ids,
                    sampling_params=child_params,
                    arrival_time=arrival,
                    prompt=text,
                    eos_token_ids=self.eos_token_ids,
                    priority=priority,
                    parent_id=request_id,
                    sample_index=i,
                )
            )
            samples.append(SampleState(i, IncrementalDetokenizer(self.tokenizer, ids, child_params)))
        parent = ParentState(request_id, text, ids, samples, delta=delta, num_prompt_logprobs=params.prompt_logprobs)
        self.output_processor.add(parent, [c.request_id for c in children])
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def _check_params(self, params: SamplingParams) -> None:
        vocab = self.config.model.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"logit_bias has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and (vocab if k == -1 else k) > MAX_LOGPROBS:
                raise ValueError(f"{name}={k} asks for more than the maximum of {MAX_LOGPROBS} logprobs")

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

    # ---- stepping --------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step and returns an output for every request that progressed."""
        if self.spec_decoder is not None:
            self.spec_decoder.propose()  # sets request.spec_token_ids for the scheduler to budget
        so = self.scheduler.schedule()
        if not so.needs_workers:
            return []
        if self.spec_decoder is not None:
            self.spec_decoder.attach(so)
        result = self.executor.execute_model(so)
        if self.spec_decoder is not None and not so.is_empty:
            self.spec_decoder.record(so, result.sampled_token_ids)
        if so.is_empty:  # only block copies or dropped states this step
            return []
        logprobs = dict(zip(result.req_ids, result.logprobs)) if result.logprobs else {}
        for rid, (first, entries) in getattr(result, "prompt_logprobs", {}).items():
            self.output_processor.add_prompt_logprobs(rid, first, entries)
        touched: dict[str, None] = {}
        for req, new in self.scheduler.update_from_output(so, result.sampled_token_ids):
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

    def get_stats(self) -> dict:
        kv = self.kv_cache
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_swapped": self.scheduler.num_swapped,
            **kv.get_stats(),
            **{f"scheduler_{k}": v for k, v in asdict(self.scheduler.stats).items()},
            "prompt_tokens_total": self.scheduler.stats.num_prefill_tokens,
            "generation_tokens_total": self.num_generation_tokens,
            **(self.spec_decoder.get_stats() if self.spec_decoder is not None else SpecDecodingStats().as_dict()),
        }

    def shutdown(self) -> None:
        self.executor.shutdown()
