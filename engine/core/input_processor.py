"""Turns what a caller gives (a prompt and SamplingParams) into what the engine queues: token ids
and a checked, filled-in copy of the params.

One implementation for every front end: ``LLM`` / ``LLMEngine.add_request`` process here, and the
OpenAI server processes here too (in its tokenizer thread, with its own tokenizer) and hands the
result to the engine, which then queues it without checking again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from engine.core.stop_strings import stop_matcher
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

PromptType = str | dict | list[int]

_PARAM_NAMES = frozenset(f.name for f in fields(SamplingParams))


class InvalidInputError(ValueError):
    """A request the engine cannot take; ``param`` names the input field at fault (the server
    reports it as OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ProcessedInput:
    """A validated request input, ready to queue."""

    prompt: str | None  # the text, when the caller gave one
    prompt_token_ids: list[int]
    params: SamplingParams  # the caller's params, copied, validated and filled in from the tokenizer
    # (or PoolingParams, copied and validated, for a pooling request: engine/pooling/inputs.py)
    lora_request: Any = None  # engine.lora.request.LoRARequest: the adapter it runs with (None: base)
    # beam search's continuations (engine/scheduler/retained_kv.py); n must be 1 with either
    kv_source: str | None = None  # a finished request, kept with retain_kv, whose blocks it forks
    retain_kv: bool = False  # keep this request's blocks when it finishes, until released


@dataclass(frozen=True)
class InputProcessor:
    tokenizer: Any
    vocab_size: int
    eos_token_ids: frozenset[int] = frozenset()
    # the scheduler's admission check: raises PromptTooLongError for a prompt it could never run
    check_prompt: Callable[[int], None] | None = None
    max_logprobs: int = MAX_LOGPROBS
    # structured outputs: parses each constraint (a 400 / InvalidGrammarError naming the field) and
    # starts compiling it (engine/structured_output/manager.py)
    structured_output: Any = None
    pooler_config: Any = None  # engine.pooling.config.PoolerConfig: which ``dimensions`` are allowed
    runner: str = "generate"  # "pooling": generation requests are refused

    def with_tokenizer(self, tokenizer: Any) -> "InputProcessor":
        """The same checks with another tokenizer (HF fast tokenizers must not be shared across threads)."""
        return replace(self, tokenizer=tokenizer)

    def process(self, prompt: PromptType, params: SamplingParams | None = None) -> ProcessedInput:
        """Tokenizes and checks one request; raises ValueError (InvalidInputError naming the field,
        or PromptTooLongError) for input the engine cannot take. ``params`` is not modified."""
        from engine.pooling.params import PoolingParams

        if isinstance(params, PoolingParams):
            from engine.pooling.inputs import process_pooling

            return process_pooling(self, prompt, params)
        if self.runner == "pooling":
            raise InvalidInputError("this model was started with runner='pooling' (task='embed'): it serves "
                                    "embeddings only; start it without that flag to generate", "model")
        params = params.clone() if params is not None else SamplingParams()
        try:
            params.validate()
        except InvalidInputError:
            raise
        except ValueError as e:  # SamplingParams' messages start with the field's name
            word = str(e).split(" ", 1)[0]
            raise InvalidInputError(str(e), word if word in _PARAM_NAMES else None) from None
        text, ids = self.tokenize_prompt(prompt)
        if self.check_prompt is not None:
            self.check_prompt(len(ids))
        self.check_params(params)
        try:
            params.update_from_tokenizer(self.tokenizer, self.vocab_size)
        except ValueError as e:  # bad_words that tokenize outside the vocabulary
            raise InvalidInputError(str(e), "bad_words") from None
        params.update_eos_token_ids(self.eos_token_ids)
        check_some_token_allowed(params)
        if params.stop:
            stop_matcher(tuple(params.stop))  # built here (off the engine thread), then cached
        if params.structured_outputs is not None:
            if self.structured_output is None:
                raise InvalidInputError("structured outputs are not available here", "structured_outputs")
            params.structured_outputs = self.structured_output.validate(params.structured_outputs)
        return ProcessedInput(text, ids, params)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a string, a list of token ids, or a dict with
        ``prompt_token_ids`` and/or ``prompt``."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self.check_ids(prompt["prompt_token_ids"], "prompt_token_ids")
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise InvalidInputError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, (list, tuple)):
            return None, self.check_ids(list(prompt), "prompt")
        raise TypeError(f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        """A copy of ``ids``; raises InvalidInputError(param) unless every one is in the vocabulary."""
        vocab = self.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool):
                raise InvalidInputError(f"{param} must hold integer token ids, got {t!r}", param)
            if not 0 <= t < vocab:
                raise InvalidInputError(f"{param} has token id {t!r}, out of range [0, {vocab})", param)
        return list(ids)

    def check_params(self, params: SamplingParams) -> None:
        """The checks SamplingParams cannot make alone: token ids against the vocabulary, logprob caps."""
        vocab = self.vocab_size
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids or []),
            ("logit_bias", list(params.logit_bias or ())),
        ):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidInputError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad[:5]}", name)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and (vocab if k == -1 else k) > self.max_logprobs:
                raise InvalidInputError(
                    f"{name}={k} asks for more than the maximum of {self.max_logprobs} logprobs", name
                )


def check_some_token_allowed(params: SamplingParams) -> None:
    """Raises InvalidInputError when allowed_token_ids leaves nothing to sample: every allowed id is
    a single-token bad word, or (for the first min_tokens tokens) a stop or EOS id, which min_tokens
    bans until then. The sampler would otherwise have only -inf logits to choose from."""
    if params.allowed_token_ids is None:
        return
    allowed = set(params.allowed_token_ids)
    banned = {seq[0] for seq in params.bad_words_token_ids or () if len(seq) == 1}
    if not allowed - banned:
        raise InvalidInputError(
            "allowed_token_ids leaves no token to sample: every allowed id is banned by bad_words",
            "allowed_token_ids",
        )
    if params.min_tokens and not allowed - banned - params.all_stop_token_ids:
        raise InvalidInputError(
            f"allowed_token_ids leaves no token to sample for the first min_tokens={params.min_tokens} tokens: "
            "every allowed id is an EOS or stop token, which min_tokens forbids until then",
            "allowed_token_ids",
        )
