"""Decode steps replayed as kernel plans on CPU: the counterpart of engine/worker/cuda_graph.py.

On a 2-core CPU a SmolLM2 decode step at batch 1 is ~16 ms of weight streaming behind ~300 C kernel
calls, and calling them from Python (module calls, checks, ctypes conversions) costs another
~8 ms. The first time a pure-decode step of a bucketed batch size runs, this runner records the
model's forward pass over static input buffers (the kernels run while they are recorded); later
steps of that size copy their inputs into the buffers, look up the token embeddings and replay the
whole pass with one C call (engine/kernels/cpu/plan.py).

With LoRA enabled the plans include the adapter delta: every LoRA layer's C kernel
(engine/kernels/cpu/fp32_gemm.c's f32_lora_add) reads each row's slot from a static buffer that a
replay refills, so steps mixing adapters and base rows replay like any other.

A plan is trusted only after a check: for fresh random tokens (and random adapter slots), a replay
must give the same bits as an eager pass. A bucket whose pass has anything but recorded kernels in it (a torch fallback, e.g.
torch's GEMM for batches past the C matmul's range, or a tensor-parallel all-reduce) fails the
check and runs eagerly from then on. The LM head and sampling stay outside, on the real rows.
"""
from __future__ import annotations

import logging

import torch

from engine.attention.metadata import attention_context
from engine.kernels.cpu.ops import CpuFp32Kernels
from engine.kernels.cpu.plan import KernelPlan, PlanArena, recording
from engine.lora.layers import LoRAContext, lora_context
from engine.worker.cuda_graph import StaticDecodeInputs, bucket_for

logger = logging.getLogger(__name__)

# padding a step up to its bucket costs at most ~25% more rows (the packed GEMM covers every batch size)
CPU_PLAN_SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]


class DecodePlan:
    """One bucket's recorded pass: replaying it reads ``embeddings`` and writes ``hidden``."""

    def __init__(self, plan: KernelPlan, embeddings: torch.Tensor, hidden: torch.Tensor) -> None:
        self.plan, self.embeddings, self.hidden = plan, embeddings, hidden


class CpuGraphRunner:
    """Records (lazily, per bucket) and replays the model's decode forward pass as kernel plans."""

    def __init__(self, model: torch.nn.Module, kernels: CpuFp32Kernels, max_num_seqs: int, max_model_len: int,
                 block_size: int, max_loras: int = 0) -> None:
        from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding

        self.model = model
        self.kernels = kernels
        self.sizes = [s for s in CPU_PLAN_SIZES if s <= max_num_seqs] or [1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        embeds = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)
                  and not isinstance(m, ParallelLMHead)]
        if len(embeds) != 1:
            raise ValueError("kernel plans need a model with exactly one input embedding")
        self.embed = embeds[0]
        max_blocks = -(-max_model_len // block_size)
        self.inputs = StaticDecodeInputs.allocate(self.sizes[-1], max_blocks, torch.device("cpu"))
        self.arena = PlanArena(self.sizes[-1])  # activations shared by all buckets' plans
        self.plans: dict[int, DecodePlan | None] = {}  # None: the bucket failed its check
        self.num_replays = 0
        # LoRA: each row's adapter slot (-1: the base model), read by the plans' LoRA kernels
        self.max_loras = max_loras
        self.lora_rows = torch.full((self.sizes[-1],), -1, dtype=torch.int32) if max_loras else None

    def bucket(self, num_reqs: int) -> int | None:
        """The bucket a pure-decode step of ``num_reqs`` requests replays, recording it on first use;
        None when there is none or its plan did not pass the check."""
        size = bucket_for(num_reqs, self.sizes)
        if size is None:
            return None
        if size not in self.plans:
            self.plans[size] = self._record(size)
        return size if self.plans[size] is not None else None

    def record_upto(self, num_reqs: int) -> list[int]:
        for size in self.sizes:
            if size <= num_reqs and size not in self.plans:
                self.plans[size] = self._record(size)
        return [s for s, p in self.plans.items() if p is not None and s <= num_reqs]

    def _eager(self, size: int, ids: torch.Tensor, hook=None) -> torch.Tensor:
        handle = self.embed.register_forward_hook(hook) if hook is not None else None
        lora = LoRAContext(None, self.lora_rows[:size]) if self.lora_rows is not None else None
        try:
            with attention_context(self.inputs.metadata(size, self.block_size, self.max_model_len)), lora_context(lora):
                return self.model(ids, self.inputs.positions[:size])
        finally:
            if handle is not None:
                handle.remove()

    @torch.inference_mode()
    def _record(self, size: int) -> DecodePlan | None:
        # the static inputs hold padding rows: slots -1 (nothing is written), one token of context
        self.inputs.pad(0, size)
        seen: list[torch.Tensor] = []
        plan = KernelPlan(self.kernels.run_plan, self.arena)
        with recording(plan):
            hidden = self._eager(size, self.inputs.input_ids[:size], lambda m, i, o: seen.append(o))
        if len(seen) != 1 or len(plan) == 0:
            return None
        decode = DecodePlan(plan, seen[0], hidden)
        plan.keep(seen[0], hidden)
        # the check: fresh tokens through an eager pass and through the plan must agree bit for bit
        ids = torch.randint(0, self.embed.shard_size, (size,), dtype=torch.int64)
        if self.lora_rows is not None:  # (with rows on random slots; an empty slot adds zeros)
            self.lora_rows[:size].copy_(torch.randint(-1, self.max_loras, (size,), dtype=torch.int32))
        expected = self._eager(size, ids).clone()
        self.inputs.input_ids[:size].copy_(ids)
        self._replay(decode, size)
        if self.lora_rows is not None:
            self.lora_rows.fill_(-1)
        if not torch.equal(decode.hidden, expected):
            logger.info("decode steps of %d requests run eagerly: their pass is not all C kernels", size)
            return None
        logger.debug("recorded a kernel plan for decode steps of %d requests (%d kernels)", size, len(plan))
        return decode

    def _replay(self, decode: DecodePlan, size: int) -> None:
        decode.embeddings.copy_(self.embed(self.inputs.input_ids[:size]))
        decode.plan.replay()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, lora: LoRAContext | None = None) -> torch.Tensor:
        """Hidden states of a pure-decode step ([n, hidden]) by plan replay; ``lora``: the step's
        adapter rows (None: every row on the base model)."""
        n = input_ids.shape[0]
        size = self.bucket(n)
        if size is None or meta.num_decodes != n:
            raise ValueError(f"no kernel plan for a decode step of {n} requests")
        if lora is not None and self.lora_rows is None:
            raise ValueError("this runner's plans were recorded without LoRA")
        self.inputs.fill(n, size, input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables)
        if self.lora_rows is not None:
            self.lora_rows.fill_(-1)
            if lora is not None:
                self.lora_rows[:n].copy_(lora.row_slot)
        decode = self.plans[size]
        self._replay(decode, size)
        self.num_replays += 1
        return decode.hidden[:n]
