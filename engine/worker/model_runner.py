"""Flattens a scheduled step into one unpadded batch, runs the model, samples (verifying speculative
proposals) and proposes for the next step: the worker's whole step, engine/worker/worker.py's
``execute_model``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.attention.kv_format import make_kv_format
from engine.attention.metadata import AttentionMetadata, attention_context, build_attention_metadata
from engine.config import EngineConfig
from engine.lora.layers import LoRAContext, lora_context
from engine.lora.manager import LoRAModelManager, make_lora_manager
from engine.models.loader import load_model, weight_bytes
from engine.pooling.pooler import Pooler, make_pooler, pooling_rows
from engine.request import NO_TOKEN
from engine.sample.logprobs import compute_prompt_logprobs
from engine.sample.metadata import SamplingMetadata
from engine.sample.sampler import Sampler
from engine.scheduler.output import SchedulerOutput
from engine.spec_decode.proposer import DraftRequest, Proposer, make_proposer
from engine.structured_output.apply import attach_grammar
from engine.worker.graph_runner import StepGraphRunner, make_step_graph_runner
from engine.worker.kv_prefault import KVPrefaulter, start_prefault
from engine.worker.lazy_zeros import lazy_zeros, zeros_on
from engine.worker.request_state import CachedRequestState

logger = logging.getLogger(__name__)


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # per scheduled request; empty when nothing was sampled
    # per scheduled request: list over sampled tokens of (token ids, logprobs, rank of the sampled one)
    logprobs: list[list[tuple[list[int], list[float], int]] | None] = field(default_factory=list)
    # req id -> (index of the first prompt token scored, entries): see engine/sample/logprobs.py
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)
    # speculative decoding: req id -> proposals for its next step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # pooling: req id -> pooled hidden state (fp32, host) of each pooling request whose prompt finished
    pooler_output: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model_config = config.model
        self.block_size = config.cache.block_size
        self.kv_format = make_kv_format(config.cache.cache_dtype, self.model_config.dtype)  # how K/V are stored
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # swap space
        self.kv_prefault: KVPrefaulter | None = None  # faults the CPU cache's pages in while cores idle
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.attn_backend = None
        self.graph_runner: StepGraphRunner | None = None  # decode-step replay, unless enforce_eager
        spec = config.speculative_config
        self.proposer: Proposer | None = make_proposer(spec, config, device) if spec is not None else None
        self.lora: LoRAModelManager | None = None  # LoRA slots and host LRU (enable_lora), made with the model
        self.max_model_len = self.model_config.max_model_len  # capped by the cache in init_kv_cache
        self.pooler: Pooler = make_pooler(config.pooler_config)  # for pooling requests (embeddings)

    # ---- set-up ----------------------------------------------------------------------------
    def load_model(self, show_progress: bool = True) -> None:
        mc = self.model_config
        self.model = load_model(mc.hf_config, mc.path, mc.dtype, self.device, show_progress, mc.quantization,
                                gguf_file=getattr(mc, "gguf_file", None))
        self.lora = make_lora_manager(self.config, self.model, self.device)
        from engine.attention.backends.selector import get_attention_backend

        self.attn_backend = get_attention_backend(self.config.attention_backend, self.device, self.kv_format)
        if self.proposer is not None:
            self.proposer.load(show_progress=False)

    def attention_layers(self) -> list:
        from engine.layers.attention import Attention

        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def weight_bytes(self) -> int:
        """Bytes of parameters held: the model's and the proposer's (a draft model's)."""
        return weight_bytes(self.model) + (self.proposer.weight_bytes() if self.proposer is not None else 0)

    def kv_bytes_per_block(self) -> int:
        """Bytes of the target's K/V per block (what swapping moves)."""
        return sum(self.kv_format.bytes_per_block(self.block_size, a.num_kv_heads, a.head_dim)
                   for a in self.attention_layers())

    def cache_bytes_per_block(self) -> int:
        """Bytes per block of every cache sized with the target's: its K/V and a draft model's."""
        extra = self.proposer.kv_bytes_per_block() if self.proposer is not None else 0
        return self.kv_bytes_per_block() + extra

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocates every layer's K and V cache (zeroed, so unwritten slots are finite; on CPU as
        anonymous memory that takes pages only where blocks are written: engine/worker/lazy_zeros.py)."""
        self.kv_caches = []
        kv = self.kv_format
        for attn in self.attention_layers():
            shape = kv.cache_shape(num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            k = zeros_on(shape, kv.cache_dtype, self.device)
            v = zeros_on(shape, kv.cache_dtype, self.device)
            attn.k_cache, attn.v_cache, attn.backend = k, v, self.attn_backend
            self.kv_caches.append((k, v))
        self.max_model_len = min(self.model_config.max_model_len, num_blocks * self.block_size)
        if self.kv_prefault is not None:
            self.kv_prefault.stop()
        # first writes would page-fault inside steps: fault the pages in while cores idle
        self.kv_prefault = start_prefault([t for kv in self.kv_caches for t in kv])
        if self.proposer is not None:
            self.proposer.init_cache(num_blocks)
        self.graph_runner = make_step_graph_runner(self.config, self.model, self.attn_backend, self.device)

    def record_decode_plans(self, num_reqs: int) -> list[int]:
        """Records the decode replays (CPU kernel plans) of up to ``num_reqs`` requests now."""
        return self.graph_runner.record_upto(num_reqs) if self.graph_runner is not None else []

    def shutdown(self) -> None:
        if self.kv_prefault is not None:
            self.kv_prefault.stop()

    @torch.inference_mode()
    def run_dummy_prefill(self, num_tokens: int, num_logits: int) -> None:
        """One prefill of ``num_tokens`` tokens on a scratch KV cache, then logits for ``num_logits``
        rows: the largest step the scheduler can send. Used to measure peak activation memory."""
        bs = self.block_size
        nblocks = -(-num_tokens // bs)
        layers = self.attention_layers()
        saved = [(a.k_cache, a.v_cache, a.backend) for a in layers]
        kv = self.kv_format
        for a in layers:
            shape = kv.cache_shape(nblocks, bs, a.num_kv_heads, a.head_dim)
            a.k_cache = torch.zeros(shape, dtype=kv.cache_dtype, device=self.device)
            a.v_cache = torch.zeros(shape, dtype=kv.cache_dtype, device=self.device)
            a.backend = self.attn_backend
        dev = self.device
        meta, positions = build_attention_metadata([num_tokens], [0], [list(range(nblocks))], bs, dev)
        try:
            with attention_context(meta):
                hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=dev), positions)
            self.model.compute_logits(hidden[-num_logits:])
        finally:
            for a, (k, v, b) in zip(layers, saved):
                a.k_cache, a.v_cache, a.backend = k, v, b

    def profile_peak_memory(self) -> int:
        """Bytes of GPU memory the largest step needs beyond weights and KV cache (measured)."""
        sc = self.config.scheduler
        num_tokens = min(sc.max_num_batched_tokens, self.model_config.max_model_len)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.run_dummy_prefill(num_tokens, min(num_tokens, sc.max_num_seqs))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return max(peak, 0)

    def init_swap_space(self, num_host_blocks: int) -> None:
        """Host copies of every layer's K/V cache, same block layout, for preemption by swap."""
        pin = self.device.type == "cuda"

        def host(t: torch.Tensor) -> torch.Tensor:
            shape = (num_host_blocks, *t.shape[1:])
            return torch.zeros(shape, dtype=t.dtype, pin_memory=True) if pin else lazy_zeros(shape, t.dtype)

        self.host_kv_caches = [(host(k), host(v)) for k, v in self.kv_caches]

    def _apply_block_ops(self, so: SchedulerOutput) -> None:
        """Runs the step's block copies before its forward pass. Every read of a block that may have
        been freed and handed out again in this step (swap-out and copy-on-write sources) happens
        before any write into a fresh block: swap-outs, then copy-on-write, then swap-ins."""
        if so.swap_out:
            src = torch.tensor([d for d, _ in so.swap_out], device=self.device)
            dst = torch.tensor([h for _, h in so.swap_out])
            for (k, v), (hk, hv) in zip(self.kv_caches, self.host_kv_caches):
                hk[dst] = k[src].to("cpu")
                hv[dst] = v[src].to("cpu")
        if so.copy_blocks:
            src = torch.tensor([s for s, _ in so.copy_blocks], device=self.device)
            dst = torch.tensor([d for _, d in so.copy_blocks], device=self.device)
            for k, v in self.kv_caches:
                k[dst] = k[src]
                v[dst] = v[src]
        if so.swap_in:
            src = torch.tensor([h for h, _ in so.swap_in])
            dst = torch.tensor([d for _, d in so.swap_in], device=self.device)
            for (k, v), (hk, hv) in zip(self.kv_caches, self.host_kv_caches):
                k[dst] = hk[src].to(self.device)
                v[dst] = hv[src].to(self.device)

    # ---- per step --------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        # preempted requests keep their state (and generator) until they resume or finish
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for data in so.new_requests:
            self.requests[data.req_id] = CachedRequestState.create(data, self.device)
        for data in so.cached_requests:
            state = self.requests[data.req_id]
            if data.reset_block_ids:
                state.block_ids = list(data.new_block_ids)
            else:
                state.block_ids.extend(data.new_block_ids)
        for rid in so.preempted_req_ids:
            if rid in self.requests:
                self.requests[rid].draft_probs = None
        self.pooler.forget(so.finished_req_ids)
        if self.lora is not None:
            self.lora.forget(so.finished_req_ids)
            for data in so.new_requests:
                self.lora.add_request(data.req_id, data.lora_request)
        if self.proposer is not None:
            self.proposer.forget(so.finished_req_ids)
            self.proposer.reset(so.preempted_req_ids)

    def _prepare(self, so: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        num_decodes = 0
        for c, sample in zip(so.num_scheduled_tokens, so.sample):
            if c != 1 or not sample:
                break
            num_decodes += 1
        meta, positions = build_attention_metadata(
            so.num_scheduled_tokens, so.num_computed_tokens, [self.requests[r].block_ids for r in so.req_ids],
            self.block_size, self.device, num_decodes,
        )
        qsl = meta.query_start_loc_host
        # positions whose logits are needed: the last token of every request that samples
        logits_indices = torch.tensor([qsl[i + 1] - 1 for i, s in enumerate(so.sample) if s], dtype=torch.int64)
        ids = torch.tensor([t for toks in so.token_ids for t in toks], dtype=torch.int64)
        return ids.to(self.device), positions, meta, logits_indices.to(self.device)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 so: SchedulerOutput, lora_ctx: LoRAContext | None = None) -> torch.Tensor:
        """Hidden states of every scheduled token: a replayed graph for pure-decode steps, else eager."""
        gr = self.graph_runner
        if (gr is not None and meta.num_decodes == meta.num_requests and not so.spec_token_ids
                and (lora_ctx is None or gr.max_loras) and gr.bucket(meta.num_requests) is not None):
            return gr.run(input_ids, positions, meta, lora_ctx)
        with attention_context(meta), lora_context(lora_ctx):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        self._apply_block_ops(so)
        if so.is_empty:
            return ModelRunnerOutput([], [])
        input_ids, positions, meta, logits_indices = self._prepare(so)
        lora_ctx = self.lora.prepare(so.req_ids, meta.query_start_loc_host) if self.lora is not None else None
        hidden = self._forward(input_ids, positions, meta, so, lora_ctx)
        prompt_lps = {}
        if any(self.requests[r].sampling_params.prompt_logprobs is not None for r in so.req_ids):
            prompt_lps = compute_prompt_logprobs(
                self.model.compute_logits, hidden, so.req_ids, so.num_scheduled_tokens,
                so.num_computed_tokens, meta.query_start_loc_host, self.requests,
            )
        rows = pooling_rows(so.req_ids, so.num_computed_tokens, meta.query_start_loc_host, self.requests)
        pooled = self.pooler.pool(hidden, rows) if rows else {}
        sampled, logprobs = self._sample(hidden, so, meta, logits_indices)
        drafts = self._propose(so, sampled) if self.proposer is not None else {}
        return ModelRunnerOutput(list(so.req_ids), sampled, logprobs, prompt_lps, drafts, pooled)

    def _sample(self, hidden: torch.Tensor, so: SchedulerOutput, meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> tuple[list[list[int]], list]:
        """Tokens (and logprobs) per scheduled row: verified proposals plus one token where the row
        carried proposals (engine/spec_decode/verify.py), one sampled token for the other rows."""
        sampled_rows = [i for i, s in enumerate(so.sample) if s]
        sampled: list[list[int]] = [[] for _ in so.req_ids]
        logprobs: list = [None for _ in so.req_ids]
        if so.spec_token_ids:
            spec = [j for j, i in enumerate(sampled_rows) if so.spec_token_ids.get(so.req_ids[i])]
            if spec:
                from engine.spec_decode.verify import verify_spec_rows

                verify_spec_rows(self.model.compute_logits, hidden, so, meta.query_start_loc_host,
                                 [sampled_rows[j] for j in spec], self.requests, sampled, logprobs, self.device)
                plain = sorted(set(range(len(sampled_rows))) - set(spec))
                logits_indices = logits_indices[torch.tensor(plain, dtype=torch.int64, device=logits_indices.device)]
                sampled_rows = [sampled_rows[j] for j in plain]
        if not sampled_rows:
            return sampled, logprobs
        logits = self.model.compute_logits(hidden.index_select(0, logits_indices))
        states = [self.requests[so.req_ids[i]] for i in sampled_rows]
        sampling = SamplingMetadata.build(states, logits.shape[-1], self.device)
        attach_grammar(sampling, so, [(so.req_ids[i], 0) for i in sampled_rows], states, self.device)
        out = self.sampler(logits, sampling)
        tokens = out.token_ids.tolist()
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        lp_ids = out.logprob_token_ids.tolist() if out.logprob_token_ids is not None else None
        ranks = out.logprob_ranks.tolist() if out.logprob_ranks is not None else None
        for j, (row, state) in enumerate(zip(sampled_rows, states)):
            sampled[row] = [tokens[j]]
            if tokens[j] == NO_TOKEN:  # the scheduler ends this request; nothing to record
                continue
            state.output_token_ids.append(tokens[j])
            if lp is not None and state.sampling_params.logprobs is not None:
                k = state.sampling_params.logprobs
                n = len(lp_ids[j]) if k == -1 else 1 + k
                logprobs[row] = [(lp_ids[j][:n], lp[j][:n], ranks[j])]
        return sampled, logprobs

    def _propose(self, so: SchedulerOutput, sampled: list[list[int]]) -> dict[str, list[int]]:
        """Proposals for the next step of every row that just sampled, each capped so it cannot pass
        max_tokens or the longest sequence, nor (a draft model) the KV slots the scheduler gave it."""
        asks: list[DraftRequest] = []
        for i, rid in enumerate(so.req_ids):
            if not sampled[i] or sampled[i][-1] == NO_TOKEN:
                continue
            state = self.requests[rid]
            state.draft_probs = None
            tokens = state.prompt_token_ids + state.output_token_ids
            limit = min(
                state.sampling_params.max_tokens - len(state.output_token_ids) - 1,  # the next step yields one too
                self.max_model_len - len(tokens),  # positions of the proposals must exist
            )
            if self.proposer.writes_kv:  # proposal j reads the K/V written at position len - 1 + j
                end = so.num_computed_tokens[i] + so.num_scheduled_tokens[i] + so.lookahead_slots.get(rid, 0)
                limit = min(limit, end - (len(tokens) - 1))
            if limit > 0:
                asks.append(DraftRequest(rid, tokens, state.block_ids, limit, state.sampling_params))
        if not asks:
            return {}
        drafts = self.proposer.propose(asks)
        out = {}
        for ask, toks, q in zip(asks, drafts.token_ids, drafts.probs):
            if toks:
                out[ask.req_id] = toks
                self.requests[ask.req_id].draft_probs = q
        return out
