"""A model-free worker for scheduler tests: its "KV cache" stores token ids per slot, so every step
checks that each scheduled request reads exactly its own tokens through its block table (which
exercises prefix hits, copy-on-write, swap-out/in and preemption the way a real runner would)."""
from __future__ import annotations

import hashlib

from engine.block_manager.kv_cache_manager import KVCacheManager
from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler

VOCAB = 1000


def next_token(context: list[int], salt: int = 0) -> int:
    """A deterministic 'model': the next token depends on the whole context (and the sample
    index, so the n > 1 samples of one prompt diverge like random samples do)."""
    digest = hashlib.blake2b(repr((salt, context)).encode(), digest_size=4).digest()
    return 3 + int.from_bytes(digest, "little") % (VOCAB - 3)


class SimWorker:
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.host: list[list[int | None]] = [[None] * block_size for _ in range(num_host_blocks)]
        self.tables: dict[str, list[int]] = {}

    def execute(self, so: SchedulerOutput, requests: dict[str, Request]) -> list[list[int]]:
        for rid in so.finished_req_ids:
            self.tables.pop(rid, None)
        for d in so.new_requests:
            if d.req_id in self.tables:
                raise AssertionError(f"{d.req_id} sent as new twice")
            self.tables[d.req_id] = list(d.block_ids)
        for d in so.cached_requests:
            if d.reset_block_ids:
                self.tables[d.req_id] = list(d.new_block_ids)
            else:
                self.tables[d.req_id].extend(d.new_block_ids)
        # the runner's order: swap-outs, copy-on-write, swap-ins
        for dev, host in so.swap_out:
            self.host[host] = list(self.kv[dev])
        copies = [list(self.kv[src]) for src, _ in so.copy_blocks]
        for (_, dst), data in zip(so.copy_blocks, copies):
            self.kv[dst] = data
        for host, dev in so.swap_in:
            self.kv[dev] = list(self.host[host])
        # write every request's new tokens first (like attention backends), then read
        for rid, start, toks in zip(so.req_ids, so.num_computed_tokens, so.token_ids):
            table = self.tables[rid]
            if table != requests[rid].block_ids:
                raise AssertionError(f"{rid}: worker table {table} != scheduler table {requests[rid].block_ids}")
            for j, tok in enumerate(toks):
                pos = start + j
                self.kv[table[pos // self.bs]][pos % self.bs] = tok
        sampled = []
        for rid, start, toks, sample in zip(so.req_ids, so.num_computed_tokens, so.token_ids, so.sample):
            table = self.tables[rid]
            end = start + len(toks)
            context = [self.kv[table[p // self.bs]][p % self.bs] for p in range(end)]
            expected = requests[rid].all_token_ids[:end]
            if context[: len(expected)] != expected:
                raise AssertionError(f"{rid} reads {context} but its tokens are {expected}")
            sampled.append([next_token(context, requests[rid].sample_index)] if sample else [])
        return sampled


def make_scheduler(
    num_blocks: int = 16,
    block_size: int = 4,
    *,
    caching: bool = True,
    num_host_blocks: int = 0,
    preemption_mode: str = "recompute",
    policy: str = "fcfs",
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 256,
    chunked: bool = True,
) -> tuple[Scheduler, SimWorker]:
    kv = KVCacheManager(num_blocks, block_size, caching, num_host_blocks)
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        policy=policy,
        preemption_mode=preemption_mode,
        enable_chunked_prefill=chunked,
    )
    return Scheduler(cfg, kv), SimWorker(num_blocks, block_size, num_host_blocks)


def make_request(
    rid: str, prompt: list[int], max_tokens: int = 8, *, arrival: float = 0.0, priority: int = 0,
    parent_id: str | None = None, sample_index: int = 0,
) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_time=arrival,
        priority=priority,
        parent_id=parent_id,
        sample_index=sample_index,
    )


def step(sched: Scheduler, worker: SimWorker) -> SchedulerOutput:
    so = sched.schedule()
    sampled = worker.execute(so, sched.requests)
    sched.update_from_output(so, sampled)
    return so


def run_to_completion(sched: Scheduler, worker: SimWorker, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Steps until every request finishes; returns each finished request's output tokens."""
    reqs = dict(sched.requests)
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        step(sched, worker)
        sched.kv_cache.check_invariants()
    else:
        raise AssertionError(f"not finished after {max_steps} steps")
    for r in reqs.values():
        assert r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED), r.status
    return {rid: list(r.output_token_ids) for rid, r in reqs.items()}


def reference_output(prompt: list[int], max_tokens: int, salt: int = 0) -> list[int]:
    toks = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(toks, salt)
        toks.append(t)
        out.append(t)
    return out
