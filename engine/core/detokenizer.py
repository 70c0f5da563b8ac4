"""Incremental detokenization with stop-string matching across token boundaries."""
from __future__ import annotations

from typing import Any

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
        self.stop_max_len = max((len(s) for s in params.stop), default=0)
        self._sent = 0  # characters of output_text already handed out as deltas

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

    def update(self, new_token_ids: list[int], num_output_tokens: int) -> str | None:
        """Decodes new tokens and checks stop strings. Returns the matched stop string, if any
        (the text is then truncated as the request asks)."""
        if not self.params.detokenize:
            return None
        for tok in new_token_ids:
            before = len(self.output_text)
            self.output_text += self.decode_token(tok)
            if self.params.stop and num_output_tokens >= self.params.min_tokens:
                stop = self._find_stop(before)
                if stop is not None:
                    return stop
        return None

    def _find_stop(self, new_from: int) -> str | None:
        text = self.output_text
        search_from = max(new_from - self.stop_max_len + 1, 0)
        best: tuple[int, str] | None = None
        for s in self.params.stop:
            idx = text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.output_text = text[: idx + len(s)] if self.params.include_stop_str_in_output else text[:idx]
        return s

    def get_delta(self, finished: bool) -> str:
        """New text since the last call, holding back characters that may begin a stop string."""
        end = len(self.output_text)
        if not finished and self.stop_max_len > 1 and not self.params.include_stop_str_in_output:
            end = max(end - self.stop_max_len + 1, self._sent)
        delta = self.output_text[self._sent : end]
        self._sent = end
        return delta
