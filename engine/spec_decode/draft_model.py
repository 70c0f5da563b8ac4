"""A draft model proposes k tokens autoregressively with its own paged KV cache.

The draft cache has as many blocks as the target's and is addressed through the target's block
tables, so no second allocator is needed: a request's draft K/V lives in the same block ids as
its target K/V. Per request the proposer remembers which tokens its K/V was written for (and
through which table); before proposing it recomputes only from the first position where that
record no longer matches the request (rejected proposals, a preemption, a copy-on-write), then
runs one pass over the new tokens and k - 1 single-token passes.

Proposals never affect correctness (the target verifies every token); the draft cache only has
to be right for the acceptance rate to be good. The draft therefore writes only where that
cannot disturb another request: positions the target has already computed (identical content
in every table sharing the block) and blocks the request holds alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from engine.attention.metadata import attention_context, build_attention_metadata
from engine.config import EngineConfig, ModelConfig
from engine.models.loader import weight_bytes
from engine.sample.draw import random_sample
from engine.sample.sampler import apply_min_p, apply_top_k_top_p
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.proposer import DraftRequest, Drafts, Proposer

DRAFT_SEED_OFFSET = 0x5DEECE66D  # seeded requests draw their proposals from a separate stream


@dataclass
class DraftState:
    tokens: list[int] = field(default_factory=list)  # token at each position whose draft K/V is written
    block_ids: list[int] = field(default_factory=list)  # the table those positions were written through
    num_verified: int = 0  # tokens[:num_verified] are known to match the request
    generator: torch.Generator | None = None


@dataclass
class _Seq:
    """One request's part of a draft pass."""

    index: int  # into the proposer's request list
    token_ids: list[int]
    start: int  # position of token_ids[0]
    block_ids: list[int]


class DraftModelProposer(Proposer):
    """Runs inside every worker, sharded like the target (its layers read the same tensor-parallel
    group), so each rank holds its slice of the draft's weights and cache."""

    writes_kv = True

    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, device: torch.device) -> None:
        self.k = spec.num_speculative_tokens
        hf = spec.draft_hf_config
        max_len = config.model.max_model_len
        draft_max = getattr(hf, "max_position_embeddings", max_len) or max_len
        if draft_max < max_len:
            raise ValueError(
                f"speculative_config.model: the draft handles {draft_max} positions, fewer than "
                f"max_model_len={max_len}; lower max_model_len or pick another draft"
            )
        model = ModelConfig(
            path=spec.draft_path, hf_config=hf, dtype=config.model.dtype, max_model_len=max_len,
            architecture=hf.architectures[0],
        )
        # the draft's passes run eagerly: their batches change shape every step
        self.config = dataclasses.replace(config, model=model, speculative_config=None, enforce_eager=True)
        self.device = device
        self.block_size = config.cache.block_size
        self.runner = None  # a ModelRunner of the draft, made by load()
        self.states: dict[str, DraftState] = {}

    # ---- set-up ----------------------------------------------------------------------------
    def load(self, show_progress: bool = False) -> None:
        from engine.worker.model_runner import ModelRunner

        self.runner = ModelRunner(self.config, self.device)
        self.runner.load_model(show_progress=show_progress)

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def weight_bytes(self) -> int:
        return weight_bytes(self.runner.model)

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def forget(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.states.pop(rid, None)

    def reset(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:  # keep the random stream, drop the record of written K/V
            st = self.states.get(rid)
            if st is not None:
                self.states[rid] = DraftState(generator=st.generator)

    # ---- proposing -------------------------------------------------------------------------
    def _state(self, req: DraftRequest) -> DraftState:
        st = self.states.get(req.req_id)
        if st is None:
            gen = None
            if req.sampling_params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((req.sampling_params.seed + DRAFT_SEED_OFFSET) % (1 << 63))
            st = self.states[req.req_id] = DraftState(generator=gen)
        return st

    def propose(self, requests: list[DraftRequest]) -> Drafts:
        out: list[list[int]] = [[] for _ in requests]
        seqs: list[_Seq] = []
        num_props: list[int] = []
        for i, req in enumerate(requests):
            st = self._state(req)
            n = len(req.token_ids)
            v = min(self._valid_prefix(st, req), n - 1)
            seqs.append(_Seq(i, req.token_ids[v:], v, list(req.block_ids)))
            num_props.append(min(self.k, req.max_drafts))
            st.tokens = list(req.token_ids)
            st.block_ids = list(req.block_ids)
            st.num_verified = n
        qs: dict[int, list[torch.Tensor]] = {}
        for step in range(max(num_props, default=0)):
            active = [(s, m) for s, m in zip(seqs, num_props) if m > step]
            tokens = self._draft_pass([s for s, _ in active], requests, qs)
            for (s, m), tok in zip(active, tokens):
                out[s.index].append(tok)
                if step + 1 < m:  # feed it back: its K/V is written by the next pass
                    self.states[requests[s.index].req_id].tokens.append(tok)
                    s.start += len(s.token_ids)
                    s.token_ids = [tok]
        probs = [torch.stack(qs[i]) if i in qs else None for i in range(len(requests))]
        return Drafts(out, probs)

    def _valid_prefix(self, st: DraftState, req: DraftRequest) -> int:
        toks = req.token_ids
        v = st.num_verified
        limit = min(len(st.tokens), len(toks))
        while v < limit and st.tokens[v] == toks[v]:
            v += 1
        table = req.block_ids
        if table[: len(st.block_ids)] != st.block_ids:
            first = 0
            while first < min(len(table), len(st.block_ids)) and table[first] == st.block_ids[first]:
                first += 1
            v = min(v, first * self.block_size)
        return v

    @torch.inference_mode()
    def _draft_pass(self, seqs: list[_Seq], requests: list[DraftRequest], qs: dict[int, list[torch.Tensor]]) -> list[int]:
        """One forward pass of the draft over each sequence's new tokens; returns the token each
        proposes next (argmax for greedy requests, a draw from its q for random ones)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) != 1)  # decodes first
        batch = [seqs[i] for i in order]
        hidden, last = self._forward(batch)
        logits = self.runner.model.compute_logits(hidden.index_select(0, last)).float()
        params = [requests[s.index].sampling_params for s in batch]
        tokens = logits.argmax(dim=-1)
        rand = [r for r, p in enumerate(params) if not p.is_greedy]
        if rand:
            probs = self._draft_distribution(logits[rand], [params[r] for r in rand])
            gens = [self.states[requests[batch[r].index].req_id].generator for r in rand]
            drawn = random_sample(probs, {j: g for j, g in enumerate(gens) if g is not None})
            tokens[rand] = drawn
            for j, r in enumerate(rand):
                qs.setdefault(batch[r].index, []).append(probs[j])
        result = [0] * len(seqs)
        for pos, tok in zip(order, tokens.tolist()):
            result[pos] = tok
        return result

    @staticmethod
    def _draft_distribution(logits: torch.Tensor, params: list) -> torch.Tensor:
        """q: the draft's logits under each request's temperature, min-p, top-k and top-p."""
        dev = logits.device
        vocab = logits.shape[-1]
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        scaled = logits / temp[:, None]
        if any(p.min_p > 0 for p in params):
            scaled = apply_min_p(scaled, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev))
        top_k = top_p = None
        if any(0 < p.top_k < vocab for p in params):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dtype=torch.int64, device=dev)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        return apply_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)

    def _forward(self, batch: list[_Seq]) -> tuple[torch.Tensor, torch.Tensor]:
        meta, positions = build_attention_metadata(
            [len(s.token_ids) for s in batch], [s.start for s in batch], [s.block_ids for s in batch],
            self.block_size, self.device,
        )
        ids = torch.tensor([t for s in batch for t in s.token_ids], dtype=torch.int64, device=self.device)
        with attention_context(meta):
            hidden = self.runner.model(ids, positions)
        last = torch.tensor([q - 1 for q in meta.query_start_loc_host[1:]], dtype=torch.int64, device=self.device)
        return hidden, last
