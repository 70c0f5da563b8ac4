"""Exact verification of proposed tokens (speculative sampling, Leviathan et al. / Chen et al.).

For a request with proposals d_0..d_{m-1}, the target supplies m + 1 rows of its sampling
distribution p (after every logits processor and the temperature / top-k / top-p / min-p
transforms): row j scores the position that d_j would fill, row m the position after the last
proposal. The draft supplies the distributions q_j it drew each d_j from, or nothing when the
proposal was deterministic (n-gram lookup, greedy drafting): q_j is then one-hot at d_j.

- greedy: accept while argmax p_j == d_j; the first disagreement is replaced by argmax p_j.
- random: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw
  from the residual max(0, p_j - q_j), normalised; the output then has exactly the law of
  sampling from p one token at a time.
- when all m are accepted, a bonus token comes from row m.
So a request yields between 1 and m + 1 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sample.draw import random_sample


@dataclass
class SpecBatch:
    """The requests of one verification group: all greedy, or all random."""

    draft_token_ids: list[list[int]]  # per request, its m_r proposals
    draft_probs: list[torch.Tensor | None]  # per request [m_r, V], or None for deterministic proposals
    generators: list[torch.Generator | None]  # per request (random groups)

    def row_starts(self) -> list[int]:
        starts, s = [], 0
        for d in self.draft_token_ids:
            starts.append(s)
            s += len(d) + 1
        return starts

    @property
    def num_rows(self) -> int:
        return sum(len(d) + 1 for d in self.draft_token_ids)


def greedy_verify(batch: SpecBatch, target_argmax: list[int]) -> list[list[int]]:
    """``target_argmax``: the argmax of each row (m_r + 1 rows per request, in order)."""
    out = []
    for start, draft in zip(batch.row_starts(), batch.draft_token_ids):
        tokens = []
        for j, d in enumerate(draft):
            t = target_argmax[start + j]
            tokens.append(t)
            if t != d:
                break
        else:
            tokens.append(target_argmax[start + len(draft)])
        out.append(tokens)
    return out


def _uniform(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device, dtype=torch.float32)


def random_verify(batch: SpecBatch, target_probs: torch.Tensor) -> list[list[int]]:
    """``target_probs``: [rows, V], m_r + 1 rows per request, each a normalised distribution."""
    device = target_probs.device
    starts = batch.row_starts()
    drafts = batch.draft_token_ids
    # p(d_j) and q(d_j) for every proposal, one draw of u per proposal
    rows = [s + j for s, d in zip(starts, drafts) for j in range(len(d))]
    toks = [t for d in drafts for t in d]
    accept: list[bool] = []
    if rows:
        rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
        toks_t = torch.tensor(toks, dtype=torch.int64, device=device)
        p_d = target_probs[rows_t, toks_t]
        q_parts, u_parts = [], []
        for d, q, gen in zip(drafts, batch.draft_probs, batch.generators):
            if not d:
                continue
            idx = torch.tensor(d, dtype=torch.int64, device=device)
            q_parts.append(torch.ones(len(d), device=device) if q is None else q[: len(d)].float().gather(1, idx[:, None])[:, 0])
            u_parts.append(_uniform(len(d), gen, device))
        q_d, u = torch.cat(q_parts), torch.cat(u_parts)
        # accept with probability min(1, p / q); q(d) > 0 because d was drawn from q
        accept = (u * q_d < p_d).tolist()
    # how many leading proposals each request keeps, and the row its last token comes from
    num_accepted, final_rows = [], []
    pos = 0
    for s, d in zip(starts, drafts):
        a = 0
        while a < len(d) and accept[pos + a]:
            a += 1
        pos += len(d)
        num_accepted.append(a)
        final_rows.append(s + a)
    dist = target_probs.index_select(0, torch.tensor(final_rows, dtype=torch.int64, device=device)).float()
    for i, (d, q, a) in enumerate(zip(drafts, batch.draft_probs, num_accepted)):
        if a == len(d):
            continue  # bonus token: sample from p itself
        if q is None:
            dist[i, d[a]] = 0.0  # max(0, p - onehot(d)) only removes d's mass
        else:
            dist[i] = (dist[i] - q[a].float()).clamp_(min=0.0)
    # a residual with no mass left can only come from rounding (p == q): fall back to p
    empty = dist.sum(dim=-1) <= 0
    if bool(empty.any()):
        dist[empty] = target_probs.index_select(0, torch.tensor(final_rows, device=device)[empty]).float()
    last = _sample(dist, batch.generators)
    return [d[:a] + [t] for d, a, t in zip(drafts, num_accepted, last.tolist())]


def _sample(weights: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row from unnormalised non-negative weights (the sampler's inverse-CDF draw)."""
    return random_sample(weights, {i: g for i, g in enumerate(generators) if g is not None})
