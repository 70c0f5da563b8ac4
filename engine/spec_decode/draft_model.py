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
from dataclasses import dataclass, field

import torch

from engine.attention.metadata import AttentionMetadata, set_attention_metadata
from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.sample.sampler import apply_min_p, apply_top_k_top_p
from engine.spec_decode.config import SpeculativeConfig

DRAFT_SEED_OFFSET = 0x5DEECE66D  # seeded requests draw their proposals from a separate stream


@dataclass
class DraftState:
    tokens: list[int] = field(default_factory=list)  # token at each position whose draft K/V is written
    block_ids: list[int] = field(default_factory=list)  # the table those positions were written through
    num_verified: int = 0  # tokens[:num_verified] are known to match the request
    num_preemptions: int = 0
    generator: torch.Generator | None = None


@dataclass
class _Seq:
    """One request's part of a draft pass."""

    index: int  # into the proposer's request list
    token_ids: list[int]
    start: int  # position of token_ids[0]
    block_ids: list[int]


class DraftModelProposer:
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig) -> None:
        from engine.worker.model_runner import ModelRunner

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
        self.config = dataclasses.replace(config, model=model, parallel=ParallelConfig(1, "uni"), speculative_config=None)
        self.device = config.device
        self.block_size = config.cache.block_size
        self.runner = ModelRunner(self.config, self.device)
        self.runner.load_model(show_progress=False)
        self.states: dict[str, DraftState] = {}
        self.draft_probs: dict[str, torch.Tensor] = {}  # this step's q rows of random requests

    # ---- set-up ----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in self.runner.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def drop(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    # ---- proposing -------------------------------------------------------------------------
    def _state(self, req) -> DraftState:
        st = self.states.get(req.request_id)
        if st is None or st.num_preemptions != req.num_preemptions:
            # a preempted request's blocks were freed (or swapped): its draft K/V is gone
            gen = st.generator if st is not None else None
            if gen is None and req.sampling_params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((req.sampling_params.seed + DRAFT_SEED_OFFSET) % (1 << 63))
            st = self.states[req.request_id] = DraftState(num_preemptions=req.num_preemptions, generator=gen)
        return st

    def _writable(self, req, kv_blocks, limit: int) -> int:
        """How many proposals ``req`` can get: proposal j needs its predecessor's K/V written at
        position n - 1 + j, inside a block the request holds alone."""
        n, bs = req.num_tokens, self.block_size
        j = 0
        while j < limit:
            b = (n - 1 + j) // bs
            if b >= len(kv_blocks) or kv_blocks[b].ref_count != 1:
                break
            j += 1
        return j

    def propose(self, requests: list, limits: list[int], kv_cache) -> list[list[int]]:
        self.draft_probs = {}
        out: list[list[int]] = [[] for _ in requests]
        seqs: list[_Seq] = []
        num_props: list[int] = []
        for i, (req, limit) in enumerate(zip(requests, limits)):
            limit = self._writable(req, kv_cache.tables.get(req.request_id, []), min(self.k, limit))
            if limit <= 0:
                continue
            st = self._state(req)
            v = min(self._valid_prefix(st, req), req.num_tokens - 1)
            seqs.append(_Seq(i, req.all_token_ids[v:], v, list(req.block_ids)))
            num_props.append(limit)
            st.tokens = list(req.all_token_ids)
            st.block_ids = list(req.block_ids)
            st.num_verified = req.num_tokens
        if not seqs:
            return out
        qs: dict[int, list[torch.Tensor]] = {}
        for step in range(max(num_props)):
            active = [(s, m) for s, m in zip(seqs, num_props) if m > step]
            tokens = self._draft_pass([s for s, _ in active], requests, qs)
            for (s, m), tok in zip(active, tokens):
                out[s.index].append(tok)
                if step + 1 < m:  # feed it back: its K/V is written by the next pass
                    st = self.states[requests[s.index].request_id]
                    st.tokens.append(tok)
                    s.start += len(s.token_ids)
                    s.token_ids = [tok]
        for i, rows in qs.items():
            self.draft_probs[requests[i].request_id] = torch.stack(rows)
        return out

    def _valid_prefix(self, st: DraftState, req) -> int:
        toks = req.all_token_ids
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
    def _draft_pass(self, seqs: list[_Seq], requests: list, qs: dict[int, list[torch.Tensor]]) -> list[int]:
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
            gens = [self.states[requests[batch[r].index].request_id].generator for r in rand]
            e = torch.empty_like(probs)
            if any(g is None for g in gens):
                e.exponential_()
            for j, g in enumerate(gens):
                if g is not None:
                    e[j].exponential_(generator=g)
            drawn = (probs / e).argmax(dim=-1)
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
        bs, dev = self.block_size, self.device
        counts = [len(s.token_ids) for s in batch]
        starts = [s.start for s in batch]
        qsl = [0]
        for c in counts:
            qsl.append(qsl[-1] + c)
        seq_lens = [s + c for s, c in zip(starts, counts)]
        max_blocks = max(len(s.block_ids) for s in batch)
        tables = torch.zeros((len(batch), max_blocks), dtype=torch.int32)
        for i, s in enumerate(batch):
            tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        positions = torch.tensor([p for s, c in zip(starts, counts) for p in range(s, s + c)], dtype=torch.int64)
        req_of_token = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts))
        slots = tables[req_of_token, positions // bs].long() * bs + positions % bs
        num_decodes = sum(1 for c in counts if c == 1)
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            num_decodes=num_decodes,
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
            max_decode_seq_len=max(seq_lens[:num_decodes]) if num_decodes else 0,
            block_size=bs,
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
        )
        ids = torch.tensor([t for s in batch for t in s.token_ids], dtype=torch.int64, device=dev)
        set_attention_metadata(meta)
        try:
            hidden = self.runner.model(ids, positions.to(dev))
        finally:
            set_attention_metadata(None)
        last = torch.tensor([q - 1 for q in qsl[1:]], dtype=torch.int64, device=dev)
        return hidden, last
