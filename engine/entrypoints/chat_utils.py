"""Chat templates: messages -> prompt text and token ids.

Content formats as vLLM's --chat-template-content-format: "string" hands the template each
message's content as one string, "openai" as a list of ``{"type": "text", "text": ...}`` parts,
"auto" picks "openai" for templates that loop over a message's content.

With ``split_special_tokens`` user and tool content is tokenized with special tokens split, so
text such as ``<|im_end|>`` in a user turn is plain text and control tokens come only from the
template.
"""
from __future__ import annotations

import os
import re
import secrets
from typing import Any

CONTENT_FORMATS = ("auto", "string", "openai")
# roles whose content comes from the end user (or from tools acting on their behalf)
UNTRUSTED_ROLES = ("user", "tool")
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content)")

ROLES = ("system", "user", "assistant", "tool", "developer")


def _content_text(content: Any, index: int) -> str | None:
    """Message content as one string: a string, None (e.g. an assistant turn with tool calls), or
    a list of text parts joined by newlines, as vLLM does for templates that expect strings."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"messages[{index}].content: only text parts are supported, got {kind!r}")
        return "\n".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts")


def normalize_messages(conversation: Any) -> list[dict]:
    """Validates a conversation and flattens text-part contents to strings."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role {m['role']!r} is not one of {list(ROLES)}")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] needs a 'content'")
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"), i)
        out.append(msg)
    return out


def load_chat_template(chat_template: str | None) -> str | None:
    """A template string, or the path of a file holding one (as vLLM's --chat-template accepts)."""
    if chat_template is not None and len(chat_template) < 4096 and "{" not in chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                return f.read()
        raise ValueError(f"chat_template {chat_template!r} is neither a Jinja template nor a readable file")
    return chat_template


def detect_content_format(template: str | None) -> str:
    """"openai" when the template iterates over a message's content parts, else "string"."""
    return "openai" if template and _LOOPS_OVER_CONTENT.search(template) else "string"


def _as_parts(content: Any) -> Any:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def render_chat_prompt(
    tokenizer: Any,
    conversation: list[dict],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
    content_format: str = "string",
    split_special_tokens: bool = False,
) -> tuple[str, list[int]]:
    """The rendered prompt text and its token ids."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"content_format must be one of {list(CONTENT_FORMATS)}, got {content_format!r}")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    messages = normalize_messages(conversation)
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError("continue_final_message needs the last message to be an assistant turn")
    template = load_chat_template(chat_template)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: pass chat_template=...")
    if content_format == "auto":
        source = template if template is not None else tokenizer.chat_template
        content_format = detect_content_format(source if isinstance(source, str) else None)
    untrusted: dict[str, str] = {}
    if split_special_tokens:  # the template sees a unique marker in place of each untrusted content
        nonce = secrets.token_hex(8)
        messages = [dict(m) for m in messages]
        for i, m in enumerate(messages):
            if m["role"] in UNTRUSTED_ROLES and isinstance(m.get("content"), str):
                marker = f"\ue000{nonce}:{i}\ue001"
                untrusted[marker] = m["content"]
                m["content"] = marker
    if content_format == "openai":
        messages = [{**m, "content": _as_parts(m.get("content"))} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja errors (raise_exception in templates, syntax errors)
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"the chat template failed to render: {e}") from e
    # the template already holds any BOS token: do not add special tokens again
    if not untrusted:
        return text, tokenizer.encode(text, add_special_tokens=False)
    return _encode_split(tokenizer, text, untrusted)


def _encode_split(tokenizer: Any, text: str, untrusted: dict[str, str]) -> tuple[str, list[int]]:
    """Token ids of rendered text whose markers stand for untrusted content: the template's text
    with special tokens recognised, the content with them split into plain text."""
    pattern = re.compile("|".join(re.escape(m) for m in untrusted))
    ids: list[int] = []
    pieces: list[str] = []
    pos = 0
    for match in pattern.finditer(text):
        before = text[pos:match.start()]
        if before:
            ids += tokenizer.encode(before, add_special_tokens=False)
        content = untrusted[match.group(0)]
        if content:
            ids += tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
        pieces += [before, content]
        pos = match.end()
    if text[pos:]:
        ids += tokenizer.encode(text[pos:], add_special_tokens=False)
    pieces.append(text[pos:])
    return "".join(pieces), ids


def render_chat(
    tokenizer: Any,
    conversation: list[dict],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> list[int]:
    """Prompt token ids of a conversation rendered with the chat template."""
    return render_chat_prompt(tokenizer, conversation, chat_template, add_generation_prompt, **kwargs)[1]
