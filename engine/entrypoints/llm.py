"""The offline entry point: ``LLM(...).generate(prompts, sampling_params)``."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from engine.config import EngineArgs
from engine.core.llm_engine import LLMEngine, PromptType
from engine.core.stats import EngineStats
from engine.entrypoints.beam_search import BeamSearchOutput, BeamSearchParams
from engine.outputs import EmbeddingRequestOutput, RequestOutput
from engine.lora.request import LoRARequest
from engine.pooling.params import PoolingParams
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """Loads a model (the embedded SmolLM2 when ``model`` is None) and generates in batches.

    Keyword arguments are EngineArgs fields (vLLM's names): dtype, max_model_len, block_size,
    max_num_seqs, max_num_batched_tokens, kv_cache_memory_bytes, num_gpu_blocks_override, seed, ...
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {sorted(unknown)}; see engine.config.EngineArgs")
        self.engine_args = EngineArgs(model=model, **kwargs)
        if self.engine_args.data_parallel_size > 1:  # replicas on Ray behind one router (docs/ray.md)
            from engine.dp.offline import DPOfflineEngine

            self.engine_args.validate()
            self.llm_engine = DPOfflineEngine(self.engine_args)
        else:
            self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in input order.
        ``lora_request``: one adapter for every prompt, or one (or None) per prompt (enable_lora)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (SamplingParams, PoolingParams)):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; give one or one per prompt"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts; give one or one per prompt")
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                rid = self._new_request_id()
                self.llm_engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                            lora_request=loras[i])
                ids.append(rid)
        except Exception:
            self.llm_engine.abort_request(ids)  # nothing half-submitted stays queued
            raise
        return self._run(ids, use_tqdm)

    def _new_request_id(self) -> str:
        rid = f"offline-{self._counter}"
        self._counter += 1
        return rid

    def _generate_processed(self, inputs: list, before_run: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Runs ProcessedInputs (beam search's steps, which set fields no prompt can); ``before_run``
        is called once they are all queued."""
        ids = []
        try:
            for processed in inputs:
                ids.append(self.llm_engine.add_request(self._new_request_id(), processed))
            if before_run is not None:
                before_run()
        except Exception:
            self.llm_engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm=False)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        engine = self.llm_engine
        gen_start = engine.num_generation_tokens
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(f"{(engine.num_generation_tokens - gen_start) / elapsed:.1f} tok/s", refresh=False)
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in input order (``out.outputs.embedding``): the prompts run
        through the same scheduler as generation, prefill only (engine/pooling/)."""
        prompts = self._prompt_list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt to embed")
        params = pooling_params if pooling_params is not None else PoolingParams()
        return self.generate(prompts, params, use_tqdm=use_tqdm)  # type: ignore[arg-type]

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search over the engine (engine/entrypoints/beam_search.py): one BeamSearchOutput per
        prompt, its ``sequences`` best first."""
        from engine.entrypoints.beam_search import run_beam_search

        return run_beam_search(self, self._prompt_list(prompts), params)

    @staticmethod
    def _prompt_list(prompts: Any) -> list:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Renders each conversation (one, or a list of them) with the model's chat template, or
        ``chat_template`` (a Jinja string or file), and generates a reply to each. ``tools``
        (OpenAI function tools) are rendered by the template; one that ignores them is a ValueError."""
        from engine.entrypoints.openai.tools import render_offline

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text, ids = render_offline(
                self.get_tokenizer(), conv, chat_template, add_generation_prompt, tools,
                continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs,
            )
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(
        self, conversation: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        from engine.entrypoints.chat_utils import render_chat

        return render_chat(self.get_tokenizer(), conversation, chat_template, add_generation_prompt)

    def get_stats(self) -> EngineStats:
        """A snapshot of the engine's stats: ``stats.kv_cache.kv_blocks_used``,
        ``stats.scheduler.num_preemptions``, ... (the old dict keys still read: ``stats["num_running"]``)."""
        return self.llm_engine.get_stats()

    def shutdown(self) -> None:
        """Stops the workers (Ray actors, and a local Ray cluster this LLM started). Also runs on
        ``del``, at interpreter exit, on SIGTERM and when a ``with LLM(...)`` block ends; idempotent."""
        engine = getattr(self, "llm_engine", None)
        if engine is not None and not getattr(self, "_shut_down", False):
            self._shut_down = True
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - nothing to report to during garbage collection
            pass
