"""Chat templates: messages -> prompt token ids."""
from __future__ import annotations

from typing import Any


def render_chat(
    tokenizer: Any, conversation: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True
) -> list[int]:
    if not conversation:
        raise ValueError("messages must not be empty")
    for m in conversation:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message needs 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"unknown message role {m['role']!r}")
    text = tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    # the template already holds any BOS token: do not add special tokens again
    return tokenizer.encode(text, add_special_tokens=False)
