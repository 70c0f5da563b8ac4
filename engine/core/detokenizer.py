"""Incremental detokenization with stop-string matching across token boundaries."""
from __future__ import annotations

from typing import Any

from engine.core.stop_strings import stop_matcher
from engine.sampling_params import SamplingParams

# tokens decoded before the new ones, so tokenizers that drop a leading space see context
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one step at a time.

    Text is emitted only once it is complete: a token that ends inside a multi-byte UTF-8
    character decodes to U+FFFD, and its text waits for the tokens that complete it.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self.num_output_tokens = 0
        # after a stop string: how many of the last update's tokens belong to the output
        self.num_tokens_kept: int | None = None
        self.buffer_length = params.output_text_buffer_length
        self._sent = 0  # characters of output_text already handed out as deltas
        # stop strings: one shared automaton, this sample's state in it, characters fed so far
        self._matcher = stop_matcher(tuple(params.stop)) if params.stop else None
        self._stop_state = 0
        self._scanned = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def decode_token(self, token_id: int) -> str:
        """Appends one token; returns the text it completed (possibly empty)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            # keep the window short: only the context needed for the next token matters
            if self.prefix_offset > 64:
                cut = self.prefix_offset
                self.token_ids = self.token_ids[cut:]
                self.prefix_offset -= cut
                self.read_offset -= cut
            return delta
        return ""

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Decodes new output tokens and checks stop strings.

        ``stop_terminated``: the last token is an EOS or stop token id; like vLLM, its text is not
        part of the output unless include_stop_str_in_output. Returns the matched stop string, if
        any; the text is then cut as the request asks and ``num_tokens_kept`` says how many of
        ``new_token_ids`` produced it (the rest are dropped from the output).
        """
        params = self.params
        to_decode = new_token_ids
        if stop_terminated and not params.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        for j, tok in enumerate(new_token_ids):
            self.num_output_tokens += 1
            if not params.detokenize or j >= len(to_decode):
                continue
            self.output_text += self.decode_token(tok)
            # vLLM honours stop strings once more than min_tokens tokens exist
            if self._matcher is not None and len(self.output_text) > self._scanned:
                stop = self._find_stop()
                if stop is not None:
                    self.num_output_tokens -= len(new_token_ids) - (j + 1)
                    self.num_tokens_kept = j + 1
                    return stop
        return None

    def _find_stop(self) -> str | None:
        """Feeds the text added since the last call to the stop automaton; returns the stop string
        that begins earliest among those ending in it. The text is cut at it only while stop
        strings are honoured (after min_tokens); the automaton always sees every character."""
        text = self.output_text
        self._stop_state, best = self._matcher.scan(self._stop_state, text, self._scanned)
        self._scanned = len(text)
        if best is None or self.num_output_tokens <= self.params.min_tokens:
            return None
        idx, s = best
        self.output_text = text[: idx + len(s)] if self.params.include_stop_str_in_output else text[:idx]
        return s

    def get_text(self, finished: bool) -> str:
        """All text so far, less the characters that may begin a stop string while running."""
        if finished or not self.buffer_length:
            return self.output_text
        return self.output_text[: max(len(self.output_text) - self.buffer_length, 0)]

    def get_delta(self, finished: bool) -> str:
        """New text since the last call, holding back characters that may begin a stop string."""
        end = len(self.output_text)
        if not finished:
            end = max(end - self.buffer_length, self._sent)
        delta = self.output_text[self._sent : end]
        self._sent = max(end, self._sent)
        return delta
