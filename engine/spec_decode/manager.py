"""Engine side of speculative decoding: proposes between steps, hands the draft distributions to
the step, and counts acceptances.

Flow of one engine step (engine/core/llm_engine.py):
  propose()  - each running request that is decoding gets up to k proposals in
               ``request.spec_token_ids`` (capped so it cannot pass max_tokens or max_model_len);
  scheduler  - budgets 1 + k tokens for it and puts the proposals after its last real token;
  attach()   - the draft's q rows for random requests ride on the SchedulerOutput;
  runner     - scores all k + 1 positions and runs the rejection sampler (verify.py);
  record()   - acceptance statistics.
"""
from __future__ import annotations

from typing import Any

from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.stats import SpecDecodingStats


class SpeculativeDecoder:
    def __init__(self, spec: SpeculativeConfig, config: Any) -> None:
        self.spec = spec
        self.config = config
        self.k = spec.num_speculative_tokens
        self.stats = SpecDecodingStats()
        self.scheduler = None
        self.kv_cache = None
        if spec.method == "ngram":
            self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
        else:
            from engine.spec_decode.draft_model import DraftModelProposer

            self.proposer = DraftModelProposer(spec, config)

    # ---- set-up ----------------------------------------------------------------------------
    def fit_num_blocks(self, num_blocks: int, target_bytes_per_block: int) -> int:
        """A draft cache has one block per target block: when the block count came from a memory
        budget, the budget is split between the two caches (and the draft's weights on GPUs)."""
        cache = self.config.cache
        if not self.spec.uses_draft_model or cache.num_gpu_blocks_override is not None:
            return num_blocks
        budget = num_blocks * target_bytes_per_block
        if self.config.device.type == "cuda" and cache.kv_cache_memory_bytes is None:
            budget -= self.proposer.weight_bytes()  # loaded after the target measured free memory
        return max(budget // (target_bytes_per_block + self.proposer.kv_bytes_per_block()), 0)

    def bind(self, scheduler: Any, kv_cache: Any, num_blocks: int) -> None:
        self.scheduler, self.kv_cache = scheduler, kv_cache
        scheduler.num_lookahead_tokens = self.spec.num_lookahead_slots
        if self.spec.uses_draft_model:
            self.proposer.init_cache(num_blocks)

    # ---- per step --------------------------------------------------------------------------
    def propose(self) -> None:
        sched = self.scheduler
        self.proposer.drop({rid for rid in self._known_ids() if rid not in sched.requests})
        reqs, limits = [], []
        for req in sched.running:
            req.spec_token_ids = []
            if req.num_computed_tokens != req.num_tokens - 1:
                continue  # still prefilling: nothing to verify against yet
            limit = min(
                self.k,
                req.max_tokens - req.num_output_tokens - 1,  # the step also yields one token of its own
                sched.max_model_len - req.num_tokens,  # positions of the proposals must exist
            )
            if limit > 0:
                reqs.append(req)
                limits.append(limit)
        if not reqs:
            return
        if self.spec.uses_draft_model:
            proposals = self.proposer.propose(reqs, limits, self.kv_cache)
        else:
            proposals = self.proposer.propose(reqs, limits)
        for req, props in zip(reqs, proposals):
            req.spec_token_ids = props

    def _known_ids(self) -> list[str]:
        p = self.proposer
        return list(p.states if hasattr(p, "states") else p.indexes)

    def attach(self, so: Any) -> None:
        """The draft's distributions for the proposals that were scheduled (random requests)."""
        probs = getattr(self.proposer, "draft_probs", None)
        if not probs:
            return
        so.spec_draft_probs = {rid: probs[rid][: len(s)] for rid, s in so.spec_token_ids.items() if rid in probs}

    def record(self, so: Any, sampled: list[list[int]]) -> None:
        for i, rid in enumerate(so.req_ids):
            spec = so.spec_token_ids.get(rid)
            if spec and so.sample[i] and sampled[i]:
                self.stats.observe(len(spec), len(sampled[i]) - 1)

    def get_stats(self) -> dict:
        return self.stats.as_dict()
