"""Per-request sampling controls, with vLLM's names, defaults and validation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from engine.structured_output.params import StructuredOutputsParams

_SAMPLING_EPS = 1e-5
_GREEDY_EPS = _SAMPLING_EPS
# temperatures in (0, _MIN_TEMP) are raised to it: smaller ones overflow the softmax (vLLM does the same)
_MIN_TEMP = 1e-2
# finite bounds: 1e39 is inf in fp32, and -inf / inf logits are NaN
_MAX_TEMP = 1e4
_MIN_REP, _MAX_REP = 1e-4, 1e4
# like vLLM's ModelConfig.max_logprobs: the most top logprobs a request may ask for
MAX_LOGPROBS = 20


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """What to generate and how to pick each token. Validation raises ValueError naming the field.

    Token-level options (penalties, logit_bias, allowed_token_ids, bad_words, min_tokens) act on the
    logits in the order vLLM applies them; logprobs are always those of the raw model logits.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (plus the sampled one's); -1: whole vocab
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # constrain the output to a JSON schema, regex, choice, grammar or structural tag (one kind)
    structured_outputs: StructuredOutputsParams | None = None
    # filled in by the engine: EOS ids plus stop_token_ids (suppressed until min_tokens), and the
    # token sequences of bad_words
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False, compare=False)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words or [])
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < _MIN_TEMP:
            self.temperature = _MIN_TEMP
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.validate()
        if self.temperature < _SAMPLING_EPS:
            # greedy: the sampling filters cannot change the argmax
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._all_stop_token_ids = set(self._all_stop_token_ids) | set(self.stop_token_ids)

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{name} {msg}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2.0 <= v <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {v!r}")
        # bounded so that fp32 logits divided or multiplied by them stay finite (no NaN samples)
        if not is_num(self.repetition_penalty) or not _MIN_REP <= self.repetition_penalty <= _MAX_REP:
            raise bad("repetition_penalty",
                      f"must be in [{_MIN_REP:g}, {_MAX_REP:g}], got {self.repetition_penalty!r}")
        if not is_num(self.temperature) or not 0.0 <= self.temperature <= _MAX_TEMP:
            raise bad("temperature", f"must be in [0, {_MAX_TEMP:g}], got {self.temperature!r}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", f"must be 0 or -1 (disable) or at least 1, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or (v < 0 and v != -1)):
                raise bad(name, f"must be a non-negative integer (or -1 for the whole vocabulary), got {v!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", f"must be non-empty strings, got {self.stop!r}")
        if self.stop and not self.detokenize:
            raise bad("stop", "strings need detokenize=True")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", f"must be non-empty strings, got {self.bad_words!r}")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise bad("allowed_token_ids", "must not be empty")
            if any(not is_int(t) or t < 0 for t in self.allowed_token_ids):
                raise bad("allowed_token_ids", "must be non-negative integers")
        if self.logit_bias is not None:
            for k, v in self.logit_bias.items():
                if k < 0:
                    raise bad("logit_bias", f"keys must be non-negative token ids, got {k}")
                if not math.isfinite(v) or not -100.0 <= v <= 100.0:
                    raise bad("logit_bias", f"values must be in [-100, 100], got {v}")
        if self.n > 1 and self.temperature < _SAMPLING_EPS:
            raise bad("n", f"must be 1 when using greedy sampling (temperature=0), got {self.n}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        for name in ("detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be a bool, got {getattr(self, name)!r}")

    # ---- engine-side completion ---------------------------------------------------------------
    def update_from_tokenizer(self, tokenizer: Any, vocab_size: int) -> None:
        """Tokenizes bad_words as vLLM does: each word alone and, when that gives a different
        first token of the same length, with a leading space (a word mid-text)."""
        if not self.bad_words:
            self._bad_words_token_ids = None
            return
        seqs: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            seqs.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                seqs.append(spaced)
        bad_ids = [t for s in seqs for t in s if not 0 <= t < vocab_size]
        if bad_ids:
            raise ValueError(f"bad_words tokenize to ids outside the vocabulary [0, {vocab_size}): {bad_ids[:5]}")
        self._bad_words_token_ids = seqs

    def update_eos_token_ids(self, eos_token_ids: set[int] | frozenset[int]) -> None:
        """EOS ids join the stop ids that min_tokens suppresses."""
        self._all_stop_token_ids = set(self.stop_token_ids) | set(eos_token_ids)

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        return self._bad_words_token_ids

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            abs(self.presence_penalty) >= _SAMPLING_EPS
            or abs(self.frequency_penalty) >= _SAMPLING_EPS
            or abs(self.repetition_penalty - 1.0) >= _SAMPLING_EPS
        )

    @property
    def output_text_buffer_length(self) -> int:
        """Characters held back from streamed text because they may begin a stop string."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> "SamplingParams":
        from copy import deepcopy

        return deepcopy(self)
