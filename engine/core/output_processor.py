"""Builds RequestOutputs from engine requests: text, logprobs, finish reasons, n > 1 grouping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.core.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.request import Request


@dataclass
class SampleState:
    """One sample's text and logprobs as the user sees them."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_token_start: int = 0  # for delta outputs: tokens already handed out


@dataclass
class ParentState:
    """A user-facing request: one or more samples of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    delta: bool = False  # hand out only what is new each step (streaming)
    num_cached_tokens: int = 0
    metrics: Any = None
    prompt_logprobs: Any = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[str, int]] = {}

    def add(self, parent: ParentState, child_ids: list[str]) -> None:
        self.parents[parent.request_id] = parent
        for i, cid in enumerate(child_ids):
            self.child_to_parent[cid] = (parent.request_id, i)

    def decoded(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def process(self, req: Request, new_tokens: list[int], new_logprobs: list | None) -> str | None:
        """Records a child's new tokens; returns a matched stop string (the caller then stops it)."""
        pid, idx = self.child_to_parent[req.request_id]
        parent = self.parents[pid]
        sample = parent.samples[idx]
        sample.token_ids.extend(new_tokens)
        if new_logprobs:
            if sample.logprobs is None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            for ids, lps, rank in new_logprobs:
                entry = {ids[0]: Logprob(lps[0], rank, self.decoded(ids[0]))}
                for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
                    if tid not in entry:
                        entry[tid] = Logprob(lp, r, self.decoded(tid))
                sample.logprobs.append(entry)
                sample.cumulative_logprob += lps[0]
        parent.metrics = parent.metrics or req.metrics
        return sample.detokenizer.update(new_tokens, req.num_output_tokens)

    def finish(self, req: Request) -> None:
        pid, idx = self.child_to_parent[req.request_id]
        sample = self.parents[pid].samples[idx]
        sample.finish_reason = req.status.finish_reason
        sample.stop_reason = req.stop_reason
        if req.status.finish_reason == "stop" and isinstance(req.stop_reason, str):
            # tokens after the one that completed the stop string are not part of the output
            sample.token_ids = list(req.output_token_ids)
        parent = self.parents[pid]
        parent.num_cached_tokens = max(parent.num_cached_tokens, req.num_cached_tokens)

    def make_output(self, pid: str) -> RequestOutput:
        parent = self.parents[pid]
        finished = parent.finished
        outs = []
        for s in parent.samples:
            if parent.delta:
                text = s.detokenizer.get_delta(s.finish_reason is not None)
                token_ids = s.token_ids[s.delta_token_start :]
                logprobs = s.logprobs[s.delta_token_start :] if s.logprobs is not None else None
                s.delta_token_start = len(s.token_ids)
            else:
                text = s.detokenizer.output_text
                token_ids = list(s.token_ids)
                logprobs = s.logprobs
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        out = RequestOutput(
            request_id=pid,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_logprobs=parent.prompt_logprobs,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
        )
        if finished:
            del self.parents[pid]
            for s_idx in range(len(parent.samples)):
                self.child_to_parent.pop(child_id(pid, s_idx, len(parent.samples)), None)
        return out


def child_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"
