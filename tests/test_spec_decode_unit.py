"""Speculative decoding units: config validation, n-gram lookup, and the rejection sampler's law
(chi-square against the target distribution, with power against wrong acceptance rules)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramIndex, find_ngram_proposal
from engine.spec_decode.rejection_sampler import SpecBatch, greedy_verify, random_verify
from engine.spec_decode.stats import SpecDecodingStats


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, field",
    [
        ([], "speculative_config must be a dict"),
        ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 99}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown key"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "model": "/nonexistent/draft"}, "speculative_config.model"),
    ],
)
def test_bad_config_names_the_field(raw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SpeculativeConfig.from_dict(raw)


def test_draft_vocab_must_match(tmp_path, tiny_model_path):
    from transformers import AutoConfig

    other = AutoConfig.from_pretrained(tiny_model_path)
    other.vocab_size = 1000
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeConfig.from_dict(
            {"method": "draft_model", "model": str(tiny_model_path), "num_speculative_tokens": 2}, other
        )


def test_ngram_defaults():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max, cfg.num_lookahead_slots) == (1, 4, 0)


# ---- n-gram lookup -----------------------------------------------------------------------------
def test_ngram_examples():
    # the longest suffix that occurred before wins, at its most recent occurrence
    assert find_ngram_proposal([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 1, 4, 3) == [7, 5, 2]
    assert find_ngram_proposal([1, 2, 3, 9, 8, 2, 3], 1, 1, 2) == [9, 8]  # n = 1: after the last "3"
    assert find_ngram_proposal([1, 2, 3, 4], 1, 4, 3) == []
    assert find_ngram_proposal([5, 5, 5], 1, 4, 4) == [5]  # proposals stop at the sequence end
    idx = NgramIndex(2, 3)
    assert idx.propose([4, 1, 2, 4, 1], 3) == [2, 4, 1]


@settings(max_examples=200, deadline=None)
@given(
    seq=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    cut=st.lists(st.integers(1, 40), max_size=4),
    lo=st.integers(1, 3),
    span=st.integers(0, 3),
    k=st.integers(1, 5),
)
def test_incremental_index_matches_scan(seq, cut, lo, span, k):
    """The index, grown over several steps, proposes exactly what a plain scan finds."""
    idx = NgramIndex(lo, lo + span)
    for n in sorted(set(min(c, len(seq)) for c in cut)) + [len(seq)]:
        assert idx.propose(seq[:n], k) == find_ngram_proposal(seq[:n], lo, lo + span, k)


# ---- rejection sampler -------------------------------------------------------------------------
def test_greedy_verify_rule():
    batch = SpecBatch([[5, 6, 7], [], [1, 2]], [None] * 3, [None] * 3)
    # request 0 rows: 5 ok, 6 ok, 8 != 7 -> [5, 6, 8]; request 1: only its own token 4;
    # request 2: all accepted plus bonus 9
    argmax = [5, 6, 8, 0] + [4] + [1, 2, 9]
    assert greedy_verify(batch, argmax) == [[5, 6, 8], [4], [1, 2, 9]]


def _chi2_sf(x: float, dof: int) -> float:
    """P(chi-square with ``dof`` degrees of freedom > x)."""
    if math.isinf(x):
        return 0.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was produced"
    exp = probs[keep] * n
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


V = 6
P1 = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20, 0.00])  # target at position 1
P2 = torch.tensor([[0.30, 0.10, 0.20, 0.15, 0.05, 0.20], [0.10, 0.10, 0.10, 0.10, 0.50, 0.10]])  # pos 2 | token 1
Q1 = torch.tensor([0.10, 0.10, 0.30, 0.30, 0.05, 0.15])  # draft at position 1


def _first_token_counts(rule, n: int, use_q: bool, seed: int) -> tuple[torch.Tensor, int]:
    """n verifications of one proposal for a position whose target law is P1: proposals drawn
    from Q1, or always token 3 (deterministic, as n-gram lookup). Counts of the first token."""
    torch.manual_seed(seed)
    props = torch.multinomial(Q1, n, replacement=True).tolist() if use_q else [3] * n
    counts = torch.zeros(V)
    accepted = 0
    B = 1024
    for s in range(0, n, B):
        chunk = props[s : s + B]
        batch = SpecBatch([[d] for d in chunk], [Q1[None] if use_q else None for _ in chunk], [None] * len(chunk))
        probs = torch.stack([P1, P2[0]]).repeat(len(chunk), 1)
        for toks in rule(batch, probs):
            counts[toks[0]] += 1
            accepted += len(toks) == 2
    return counts, accepted


def _always_accept(batch, probs):
    return [d + [int(torch.multinomial(probs[2 * i + 1], 1))] for i, d in enumerate(batch.draft_token_ids)]


def _resample_from_p(batch, probs):
    """Wrong: accepts with min(1, p/q) but redraws a rejected token from p, not the residual."""
    out = []
    for i, d in enumerate(batch.draft_token_ids):
        p, q = probs[2 * i], (batch.draft_probs[i][0] if batch.draft_probs[i] is not None else torch.nn.functional.one_hot(torch.tensor(d[0]), V).float())
        if torch.rand(()) * q[d[0]] < p[d[0]]:
            out.append(d + [int(torch.multinomial(probs[2 * i + 1], 1))])
        else:
            out.append([int(torch.multinomial(p, 1))])
    return out


N_DRAWS = 20000
THRESHOLD = 1e-3  # p-value below which a sampler is declared wrong


@pytest.mark.parametrize("use_q", [True, False], ids=["draft-q", "one-hot"])
def test_rejection_sampler_law(use_q):
    """The first token is distributed as the target's p, whatever the draft proposed."""
    counts, accepted = _first_token_counts(random_verify, N_DRAWS, use_q, seed=1)
    assert 0.1 * N_DRAWS < accepted < 0.9 * N_DRAWS  # acceptance and residual both exercised
    stat, dof = _chi2(counts, P1)
    assert _chi2_sf(stat, dof) > THRESHOLD, (counts / N_DRAWS, P1, stat)


@pytest.mark.parametrize("use_q", [True, False], ids=["draft-q", "one-hot"])
@pytest.mark.parametrize("rule", [_always_accept, _resample_from_p], ids=["always-accept", "resample-from-p"])
def test_chi_square_rejects_wrong_rules(use_q, rule):
    counts, _ = _first_token_counts(rule, N_DRAWS, use_q, seed=2)
    stat, dof = _chi2(counts, P1) if counts[P1 == 0].sum() == 0 else (math.inf, 1)
    assert _chi2_sf(stat, dof) < THRESHOLD, (counts / N_DRAWS, P1, stat)


def test_rejection_sampler_joint_law_over_several_proposals():
    """Three proposals drawn from a draft q per position against a context-free target (token j
    has law p_j whatever came before): each verified sequence, completed to 3 tokens by sampling
    p directly, must have the product law p_0 x p_1 x p_2 over all 27 triples."""
    torch.manual_seed(3)
    n, v = 15000, 3
    p_rows = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    q_rows = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2], [0.3, 0.4, 0.3]])
    drafts = torch.stack([torch.multinomial(q_rows[j], n, replacement=True) for j in range(3)], 1).tolist()
    outs = random_verify(SpecBatch(drafts, [q_rows] * n, [None] * n), p_rows.repeat(n, 1))
    lengths = torch.bincount(torch.tensor([len(t) for t in outs]), minlength=5)
    assert lengths[0] == 0 and all(lengths[1:] > 0), lengths  # every outcome from 1 to 4 tokens occurs
    counts = torch.zeros(v**3)
    for toks in outs:
        while len(toks) < 3:
            toks = toks + [int(torch.multinomial(p_rows[len(toks)], 1))]
        counts[toks[0] * v * v + toks[1] * v + toks[2]] += 1
    law = (p_rows[0][:, None, None] * p_rows[1][None, :, None] * p_rows[2][None, None, :]).flatten()
    stat, dof = _chi2(counts, law)
    assert _chi2_sf(stat, dof) > THRESHOLD, stat


def test_seeded_generators_reproduce():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]).repeat(4, 1)
    q = torch.tensor([[0.6, 0.2, 0.2]])

    def run():
        gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
        return random_verify(SpecBatch([[0]] * 4, [q] * 4, gens), p.clone())

    assert run() == run()


def test_stats():
    s = SpecDecodingStats()
    s.observe(3, 1)
    s.observe(2, 2)
    s.observe(0, 0)  # nothing verified: not a draft
    d = s.as_dict()
    assert d["spec_num_drafts"] == 2 and d["spec_num_draft_tokens"] == 5 and d["spec_num_accepted_tokens"] == 3
    assert d["spec_mean_accepted_length"] == pytest.approx(2.5)
    assert s.accepted_per_position == [2, 1, 0]
