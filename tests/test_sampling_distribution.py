"""Sampled token frequencies match the reference distribution (chi-square), and the test has the
power to reject a distribution where one filter is wrong."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper

from engine.sample.metadata import SamplingMetadata
from engine.sample.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.worker.request_state import CachedRequestState


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    x = TemperatureLogitsWarper(temperature)(None, logits.clone()[None].float())
    if min_p > 0:
        x = MinPLogitsWarper(min_p)(None, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x[0].softmax(-1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test over the support of ``probs``; a sample outside the support gives p = 0."""
    n = counts.sum().item()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support].double() * n
    observed = counts[support].double()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2))


def test_sampler_frequencies_match_reference():
    torch.manual_seed(0)
    vocab, n = 64, 40_000
    base = torch.linspace(3.0, -3.0, vocab)[torch.randperm(vocab)]
    settings = dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02)
    params = SamplingParams(**settings)
    states = [CachedRequestState(f"r{i}", [1], [], params, []) for i in range(n)]
    meta = SamplingMetadata.build(states, vocab, torch.device("cpu"))
    tokens = Sampler()(base.expand(n, vocab).clone(), meta).token_ids
    counts = torch.bincount(tokens, minlength=vocab)
    ref = reference_probs(base, **settings)
    assert chi_square_pvalue(counts, ref) > 1e-4
    # the same counts reject a reference with any one filter wrong
    wrong = [
        dict(settings, top_p=1.0),
        dict(settings, top_k=0),
        dict(settings, temperature=1.0),
        dict(settings, top_p=0.85),
        dict(settings, temperature=0.7),
    ]
    for w in wrong:
        assert chi_square_pvalue(counts, reference_probs(base, **w)) < 1e-6, w


def test_engine_samples_match_transformers_next_token_distribution(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.entrypoints.llm import LLM

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path))
    prompt = tok.encode("The quick brown fox")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    settings = dict(temperature=0.7, top_k=10, top_p=0.6)
    ref = reference_probs(logits, **settings)
    assert 3 <= int((ref > 0).sum()) < 10, "top_p must cut inside the top-k set for the test to have power"

    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=256, max_num_seqs=256, seed=0)
    n = 1000
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, SamplingParams(max_tokens=1, **settings), use_tqdm=False)
    tokens = torch.tensor([o.outputs[0].token_ids[0] for o in outs])
    counts = torch.bincount(tokens, minlength=logits.shape[-1])
    assert chi_square_pvalue(counts, ref) > 1e-4
    # (temperature is checked at the sampler level: this random model's logits are too flat to tell)
    for w in (dict(settings, top_p=1.0), dict(settings, top_p=0.8), dict(settings, top_k=5)):
        assert chi_square_pvalue(counts, reference_probs(logits, **w)) < 1e-6, w
    llm.shutdown()
