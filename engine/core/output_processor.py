"""Builds RequestOutputs from engine requests: text, logprobs, finish reasons, n > 1 grouping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.core.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from engine.pooling.requests import make_embedding_output
from engine.request import Request, RequestStatus

# (token ids, logprobs, rank of the first): the scored token first, then the top k
LogprobEntry = tuple[list[int], list[float], int]


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
    prompt_logprobs: Any = None  # list over prompt tokens (first None) once requested
    num_prompt_logprobs: int | None = None  # the request's prompt_logprobs setting
    prompt_logprobs_sent: bool = False  # delta mode hands them out once, when complete
    pooling_params: Any = None  # a pooling request (one sample, no tokens): engine/pooling/
    pooled: Any = None  # its pooled hidden state, once the worker returned it

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    @property
    def prompt_logprobs_complete(self) -> bool:
        return self.prompt_logprobs is not None and all(x is not None for x in self.prompt_logprobs[1:])


class OutputProcessor:
    def __init__(self, tokenizer: Any, pooler_config: Any = None) -> None:
        self.tokenizer = tokenizer
        self.pooler_config = pooler_config  # how pooled vectors are finished (normalize)
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[str, int]] = {}
        self._decoded: dict[int, str] = {}  # token id -> its text alone, for logprob entries

    def add(self, parent: ParentState, child_ids: list[str]) -> None:
        self.parents[parent.request_id] = parent
        if parent.num_prompt_logprobs is not None:
            parent.prompt_logprobs = [None] * len(parent.prompt_token_ids)
        for i, cid in enumerate(child_ids):
            self.child_to_parent[cid] = (parent.request_id, i)

    def decoded(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.tokenizer.decode([token_id])
        return text

    def _entry(self, ids: list[int], lps: list[float], rank: int, detokenize: bool) -> dict[int, Logprob]:
        """{token: Logprob}: the scored token with its rank, then the top k ranked 1..k."""
        dec = self.decoded if detokenize else (lambda _t: None)
        entry = {ids[0]: Logprob(lps[0], rank, dec(ids[0]))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, r, dec(tid))
        return entry

    def add_prompt_logprobs(self, child_req_id: str, first_index: int, entries: list[LogprobEntry]) -> None:
        located = self.child_to_parent.get(child_req_id)
        if located is None:
            return
        parent = self.parents[located[0]]
        if parent.prompt_logprobs is None:
            return
        detok = parent.samples[0].detokenizer.params.detokenize
        for j, (ids, lps, rank) in enumerate(entries):
            parent.prompt_logprobs[first_index + j] = self._entry(ids, lps, rank, detok)

    def add_pooler_outputs(self, pooled: dict) -> None:
        """Keeps the pooled hidden state the worker returned for each finished pooling request."""
        for rid, vec in pooled.items():
            located = self.child_to_parent.get(rid)
            if located is not None:
                self.parents[located[0]].pooled = vec

    def process(self, req: Request, new_tokens: list[int], new_logprobs: list | None) -> str | None:
        """Records a child's new tokens; returns a matched stop string (the caller then stops it).
        Tokens after the one that completed a stop string are dropped from the output."""
        pid, idx = self.child_to_parent[req.request_id]
        parent = self.parents[pid]
        if parent.pooling_params is not None:  # no tokens: only its finish is recorded
            parent.metrics = parent.metrics or req.metrics
            return None
        sample = parent.samples[idx]
        # the scheduler has already ended a request on an EOS or stop token id
        stop_terminated = req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str)
        stop = sample.detokenizer.update(new_tokens, stop_terminated)
        if stop is not None:
            keep = sample.detokenizer.num_tokens_kept
            new_tokens = new_tokens[:keep]
            new_logprobs = new_logprobs[:keep] if new_logprobs else new_logprobs
        sample.token_ids.extend(new_tokens)
        if new_logprobs:
            if sample.logprobs is None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            detok = sample.detokenizer.params.detokenize
            for ids, lps, rank in new_logprobs:
                sample.logprobs.append(self._entry(ids, lps, rank, detok))
                sample.cumulative_logprob += lps[0]
        parent.metrics = parent.metrics or req.metrics
        return stop

    def finish(self, req: Request) -> None:
        pid, idx = self.child_to_parent[req.request_id]
        sample = self.parents[pid].samples[idx]
        sample.finish_reason = req.status.finish_reason
        sample.stop_reason = req.stop_reason
        parent = self.parents[pid]
        parent.num_cached_tokens = max(parent.num_cached_tokens, req.num_cached_tokens)

    def make_output(self, pid: str) -> RequestOutput | EmbeddingRequestOutput:
        parent = self.parents[pid]
        finished = parent.finished
        if parent.pooling_params is not None:
            if finished:
                del self.parents[pid]
                self.child_to_parent.pop(pid, None)
            return make_embedding_output(parent, self.pooler_config)
        outs = []
        for s in parent.samples:
            done = s.finish_reason is not None
            if parent.delta:
                text = s.detokenizer.get_delta(done)
                token_ids = s.token_ids[s.delta_token_start :]
                logprobs = s.logprobs[s.delta_token_start :] if s.logprobs is not None else None
                s.delta_token_start = len(s.token_ids)
            else:
                text = s.detokenizer.get_text(done)
                token_ids = list(s.token_ids)
                logprobs = list(s.logprobs) if s.logprobs is not None else None
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
        prompt_logprobs = list(parent.prompt_logprobs) if parent.prompt_logprobs is not None else None
        if parent.delta and prompt_logprobs is not None:
            # streamed once, in the first output after the whole prompt has been scored
            if parent.prompt_logprobs_sent or not parent.prompt_logprobs_complete:
                prompt_logprobs = None
            else:
                parent.prompt_logprobs_sent = True
        out = RequestOutput(
            request_id=pid,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
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
