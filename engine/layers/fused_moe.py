"""Mixture-of-experts: a top-k router and ``FusedMoE``, the experts' weights stacked in two tensors.

``w13_weight [E, 2 * I/tp, H]`` holds every expert's gate rows then up rows and ``w2_weight
[E, H, I/tp]`` its down projection; under tensor parallelism each expert is sharded like a dense
MLP (gate/up by rows, down by columns, one all-reduce), expert parallelism is not done. A forward
pass groups the (token, choice) pairs by expert and runs each chosen expert once on its tokens,
with contiguous slices of the stacked weights (on GPU, all experts in one Triton grouped matmul per
projection: engine/kernels/moe_matmul.py): a decode step at batch 1 reads only the top-k experts'
weights (``expert_bytes_read`` counts them, for the bytes-per-step measurement)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp_group
from engine.kernels.cpu.ops import fp32_cpu_kernels
from engine.layers.quantization.base import CPU_KERNEL_MAX_ROWS
from engine.layers.activation import get_act_and_mul
from engine.layers.linear import divide

# checkpoint projection name -> which part of the stacked weights it fills
EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for one expert's contiguous weight slice: the C kernel (weights streamed at read
    bandwidth) for the few rows of a decode step on fp32 CPU, torch otherwise."""
    kernels = fp32_cpu_kernels(x, w)
    if kernels is not None and x.shape[0] <= CPU_KERNEL_MAX_ROWS and x.is_contiguous():
        return kernels.linear(x, w)
    return F.linear(x, w)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert ids [T, k]): softmax in fp32 over all experts,
    the top k, renormalised to sum to 1 when the model does (Mixtral, Qwen3-MoE's norm_topk_prob)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


class FusedMoE(nn.Module):
    def __init__(self, config: Any, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        hidden = config.hidden_size
        self.local_inter = divide(intermediate_size, tp.size)
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.local_inter, hidden), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, self.local_inter), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.act = get_act_and_mul(config)
        self.expert_bytes_read = 0  # expert weight bytes the forward passes have read

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, str]) -> None:
        """Copies this rank's slice of expert ``e``'s ``part`` (gate / up / down) into the stack."""
        e, part = shard_id
        n = self.local_inter
        if part == "down":
            param.data[e].copy_(loaded.narrow(1, self.tp_rank * n, n))
        else:
            param.data[e].narrow(0, 0 if part == "gate" else n, n).copy_(loaded.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        pair_weights = weights.reshape(-1)[order]
        experts = experts_grouped if x.is_cuda else experts_per_expert
        out = experts(x, tokens, counts, pair_weights, self.w13_weight, self.w2_weight, self.act)
        per_expert = (self.w13_weight[0].numel() + self.w2_weight[0].numel()) * x.element_size()
        self.expert_bytes_read += per_expert * sum(1 for c in counts if c)
        return get_tp_group().all_reduce(out) if self.tp_size > 1 else out


def experts_per_expert(x: torch.Tensor, tokens: torch.Tensor, counts: list[int], pair_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, act) -> torch.Tensor:
    """Each chosen expert once over its tokens (pairs sorted by expert), with contiguous weight slices."""
    out = torch.zeros_like(x)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        h = act(_matmul(x.index_select(0, rows), w13[e]))
        y = _matmul(h, w2[e]) * pair_weights[start : start + count, None]
        out.index_add_(0, rows, y)
        start += count
    return out


def experts_grouped(x: torch.Tensor, tokens: torch.Tensor, counts: list[int], pair_weights: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, act) -> torch.Tensor:
    """The same in two Triton launches (engine/kernels/moe_matmul.py): gate/up for every pair, the
    activation, down for every pair; then each pair's weighted row added to its token."""
    from engine.kernels.moe_matmul import moe_matmul

    h = act(moe_matmul(x, w13, tokens, counts))
    pairs = torch.arange(h.shape[0], device=x.device)
    y = moe_matmul(h, w2, pairs, counts) * pair_weights[:, None]
    return torch.zeros_like(x).index_add_(0, tokens, y)
