"""int8 linear layers (``quantization="int8"``): the arithmetic, batch invariance, memory, and the
model's outputs next to fp32.

W8A8 with per-row scales: weights per output channel at load time, activations per token at run
time, exact int32 products. On the real model int8 moves logits by about 0.15 on average, so greedy
output is compared to fp32 transformers up to the first step where transformers' top-2 logits are
closer than INT8_TIE (0.75): a near-tie at int8's precision, not fp32's 1e-3.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.layers.quantization import Int8LinearMethod, get_linear_method, int8_matmul, onednn_int8_matmul, quantize_rows
from engine.layers.quantization.int8 import _onednn_available
from engine.sampling_params import SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.golden_prompts import golden_prompt_ids

INT8_TIE = 0.75


def test_quantize_rows_round_trip_and_zero_rows():
    x = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) == 127  # every non-zero row uses the full range
    err = (q.float() * scale[:, None] - x).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert not torch.isnan(scale).any() and bool((q[5] == 0).all())


def test_int8_matmul_is_the_product_of_the_dequantized_operands():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 64, generator=gen), torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    w_q, w_s = quantize_rows(w)
    x_q, x_s = quantize_rows(x)
    expected = (x_q.double() * x_s[:, None].double()) @ (w_q.double() * w_s[:, None].double()).T + b.double()
    got = int8_matmul(x, w_q, w_s, b)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # and close to the fp32 product: 8-bit rows keep about 2 significant digits
    assert (got - (x @ w.T + b)).abs().max() < 0.05 * (x @ w.T).abs().max()


@pytest.mark.skipif(not _onednn_available(), reason="this torch build has no oneDNN int8 linear")
def test_onednn_kernel_computes_the_same_numbers_as_int_mm():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=gen)
    w_q, w_s = quantize_rows(w)
    packed = torch.ops.onednn.qlinear_prepack(w_q, None)
    zero = torch.zeros(96, dtype=torch.int32)
    for m in (1, 7, 33):
        x = torch.randn(m, 128, generator=gen) * 3
        assert torch.equal(onednn_int8_matmul(x, packed, w_s, zero), int8_matmul(x, w_q, w_s))


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(64, 80, bias=True)
    method = Int8LinearMethod()
    method.process_weights_after_loading(layer)
    x = torch.randn(12, 64, generator=gen)
    x[3] *= 1000  # an outlier row must not change the others' quantization
    batch = method.apply(layer, x)
    alone = torch.cat([method.apply(layer, x[i : i + 1]) for i in range(12)])
    assert torch.equal(batch, alone)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32


def test_unknown_quantization_is_a_clear_error():
    with pytest.raises(ValueError, match="quantization='fp4' is not supported"):
        get_linear_method("fp4")
    from engine.config import EngineArgs

    with pytest.raises(ValueError, match="quantization must be None or 'int8'"):
        EngineArgs(quantization="fp4").validate()


@pytest.fixture(scope="module")
def engines():
    from engine.entrypoints.llm import LLM

    fp32 = LLM(enable_prefix_caching=False, num_gpu_blocks_override=512)
    int8 = LLM(enable_prefix_caching=False, num_gpu_blocks_override=512, quantization="int8")
    yield fp32, int8
    fp32.shutdown()
    int8.shutdown()


def _weight_bytes(llm) -> tuple[int, int]:
    from engine.layers.linear import LinearBase

    model = llm.llm_engine.executor.worker.runner.model
    int8 = total = 0
    for m in model.modules():
        if isinstance(m, LinearBase):
            total += m.weight.numel()
            int8 += m.weight.numel() if m.weight.dtype == torch.int8 else 0
    return int8, total


@pytest.mark.slow
def test_int8_model_stores_int8_weights(engines):
    fp32, int8 = engines
    assert _weight_bytes(fp32)[0] == 0
    n_int8, n_total = _weight_bytes(int8)
    assert n_int8 > 0.7 * n_total  # all but the MLP down projections
    assert int8.llm_engine.executor.worker.weight_bytes() < 0.6 * fp32.llm_engine.executor.worker.weight_bytes()


@pytest.mark.slow
def test_int8_logprobs_stay_close_to_fp32(engines, default_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    ids = [t for p in golden_prompt_ids(tok) for t in p][:400]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    lps = []
    for llm in engines:
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        lps.append([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
    diffs = [abs(a - b) for a, b in zip(*lps)]
    ppl = [math.exp(-sum(lp) / len(lp)) for lp in lps]
    assert sum(diffs) / len(diffs) < 0.3, f"mean |logprob change| {sum(diffs) / len(diffs):.3f}"
    assert ppl[1] < 1.05 * ppl[0], f"perplexity fp32 {ppl[0]:.2f}, int8 {ppl[1]:.2f}"


@pytest.mark.slow
def test_int8_greedy_matches_transformers_up_to_int8_near_ties(engines, default_model_path):
    from transformers import AutoTokenizer

    prompts = golden_prompt_ids(AutoTokenizer.from_pretrained(default_model_path))[:6]
    reference = hf_greedy(default_model_path, prompts, 24)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = engines[1].generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outs, reference)):
        assert_greedy_match(list(out.outputs[0].token_ids), ref, tie_eps=INT8_TIE, label=f"int8 prompt {i}")
    kv = engines[1].llm_engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks  # every block returned
