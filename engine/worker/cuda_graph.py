"""Decode steps replayed as CUDA graphs.

A decode step of a small model is a few hundred short kernel launches; launching them from Python
costs more than running them. At start-up the runner captures one graph per bucketed batch size
over static input buffers; a pure-decode step then copies its inputs into the buffers (padding the
batch up to the bucket: padded tokens write nowhere, slot -1) and replays the graph.

The attention kernels see the worst-case context (``max_model_len``) at capture, so one graph serves
every context length: the decode kernel masks by the per-request ``seq_lens`` it reads at replay.
Sampling and the LM head stay outside the graph (they run on the real rows only).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, attention_context

logger = logging.getLogger(__name__)

_DEFAULT_SIZES = [1, 2, 4, 8] + list(range(16, 513, 16))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two up to 8, then every multiple of 16, up to max_num_seqs."""
    sizes = [s for s in _DEFAULT_SIZES if s <= max_num_seqs]
    if not sizes or sizes[-1] < min(max_num_seqs, _DEFAULT_SIZES[-1]):
        sizes.append(min(max_num_seqs, _DEFAULT_SIZES[-1]))
    return sizes


def bucket_for(num_reqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds ``num_reqs`` requests, or None when none does."""
    for s in sizes:
        if s >= num_reqs:
            return s
    return None


@dataclass
class StaticDecodeInputs:
    """The buffers every captured graph reads; a replay overwrites their first rows."""

    input_ids: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    slot_mapping: torch.Tensor  # [max_bs] int64
    seq_lens: torch.Tensor  # [max_bs] int32
    block_tables: torch.Tensor  # [max_bs, max_blocks] int32
    query_start_loc: torch.Tensor  # [max_bs + 1] int32: 0, 1, 2, ... (one token per request)

    @classmethod
    def allocate(cls, max_bs: int, max_blocks: int, device: torch.device) -> "StaticDecodeInputs":
        return cls(
            input_ids=torch.zeros(max_bs, dtype=torch.int64, device=device),
            positions=torch.zeros(max_bs, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.ones(max_bs, dtype=torch.int32, device=device),
            block_tables=torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
        )

    def fill(self, n: int, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor,
             slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
        """Copies a step of ``n`` decode requests into the first rows; rows ``n..bucket`` become padding
        (slot -1: nothing written; context of one token in block 0: finite and never read back)."""
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.seq_lens[:n].copy_(seq_lens)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(block_tables)
        self.pad(n, bucket)

    def pad(self, start: int, end: int) -> None:
        """Makes rows ``start..end`` padding: slot -1, one token of context in block 0."""
        if end > start:
            self.input_ids[start:end].zero_()
            self.positions[start:end].zero_()
            self.slot_mapping[start:end].fill_(-1)
            self.seq_lens[start:end].fill_(1)
            self.block_tables[start:end].zero_()

    def metadata(self, bucket: int, block_size: int, max_model_len: int) -> AttentionMetadata:
        """Metadata over the first ``bucket`` rows, sized for the longest possible context."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            num_decodes=bucket,
            max_query_len=1,
            max_seq_len=max_model_len,
            max_decode_seq_len=max_model_len,
            block_size=block_size,
            query_start_loc_host=list(range(bucket + 1)),
            seq_lens_host=[max_model_len] * bucket,
        )


class CUDAGraphRunner:
    """Captures and replays the model's decode forward pass for bucketed batch sizes."""

    max_loras = 0  # graphs hold no LoRA delta: a step with adapter rows runs eagerly

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; on CPU the runner stays eager")
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        self.inputs = StaticDecodeInputs.allocate(self.sizes[-1], max_blocks, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            meta = self.inputs.metadata(bs, self.block_size, self.max_model_len)
            ids, pos = self.inputs.input_ids[:bs], self.inputs.positions[:bs]
            with attention_context(meta):
                self.model(ids, pos)  # warm-up: compiles the Triton kernels outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(ids, pos)
            self.graphs[bs], self.outputs[bs] = graph, out
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def bucket(self, num_reqs: int) -> int | None:
        return bucket_for(num_reqs, self.sizes) if self.graphs else None

    def record_upto(self, num_reqs: int) -> list[int]:
        return [s for s in self.sizes if s <= num_reqs] if self.graphs else []  # captured at start-up

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, lora=None) -> torch.Tensor:
        """Hidden states of a pure-decode step ([n, hidden]) by graph replay."""
        n = input_ids.shape[0]
        bucket = self.bucket(n)
        if bucket is None or meta.num_decodes != n:
            raise ValueError(f"no captured graph for a decode step of {n} requests")
        self.inputs.fill(n, bucket, input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.outputs[bucket][:n]
