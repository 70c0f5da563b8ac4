"""Incremental detokenization: text appears once complete, multi-byte characters included."""
from __future__ import annotations

import pytest

from engine.core.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.mark.parametrize(
    "text",
    ["Hello world, this is plain text.", "Emoji 🤖🚀 and 中文字符 and café — naïve", "  leading spaces\n\tand tabs"],
)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    pieces = [detok.decode_token(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 0x7FF for c in text):
        # some token ended inside a multi-byte character: its text waited for the next token
        assert "" in pieces
