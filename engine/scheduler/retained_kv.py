"""Finished requests whose KV blocks stay in the cache for the requests that continue them.

Beam search (engine/entrypoints/beam_search.py) scores every beam with a one-token request. When a
beam's request finishes, its blocks are kept (``Request.retain_kv``); each continuation of that
beam names it as ``kv_source`` and forks its block table: every computed block is shared by
reference count, and the partial last block is copied on the child's first write (copy-on-write in
the KV-cache manager). A continuation then computes only its one new token.

Kept blocks are a cache, never a commitment: the caller releases them once it has queued the
continuations; the scheduler drops them first when blocks run short (a continuation then starts
the ordinary way, from the prefix cache); and an entry nobody releases is dropped after
``max_steps`` steps, so a caller that goes away cannot hold blocks forever.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request

RETAINED_KV_MAX_STEPS = 64


@dataclass
class RetainedKV:
    max_steps: int = RETAINED_KV_MAX_STEPS
    entries: dict[str, tuple[Request, int]] = field(default_factory=dict)  # id -> (request, step kept)
    released: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, request: Request, step: int) -> None:
        self.entries[request.request_id] = (request, step)

    def source_for(self, request: Request) -> Request | None:
        """The kept request ``request`` continues, when its computed tokens start ``request``'s
        prompt (with at least one prompt token after them) under the same adapter."""
        entry = self.entries.get(request.kv_source) if request.kv_source is not None else None
        if entry is None:
            return None
        source = entry[0]
        n = source.num_computed_tokens
        if not (0 < n < request.num_prompt_tokens) or source.lora_int_id != request.lora_int_id:
            return None
        if source.all_token_ids[:n] != request.prompt_token_ids[:n]:
            return None
        return source

    def release(self, request_ids: list[str]) -> None:
        self.released.update(rid for rid in request_ids if rid in self.entries)

    def take_due(self, step: int, wanted: set[str], everything: bool = False) -> list[Request]:
        """Removes and returns the entries to free now: released (or expired) ones no waiting
        request still names as its source; with ``everything``, all of them."""
        due = [rid for rid, (_, kept) in self.entries.items()
               if everything or ((rid in self.released or step - kept >= self.max_steps) and rid not in wanted)]
        out = []
        for rid in due:
            out.append(self.entries.pop(rid)[0])
            self.released.discard(rid)
        return out
