"""Embeddings (pooling requests) from the engine: equal to sentence-transformers and to
transformers' hidden states, batched as alone, chunked, mixed with generation, every block back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.input_processor import InvalidInputError
from engine.entrypoints.llm import LLM
from engine.errors import PromptTooLongError
from engine.outputs import EmbeddingRequestOutput
from engine.pooling import PoolingParams, PoolingType, resolve_pooler_config
from engine.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama
from tests.golden_prompts import PLAIN_PROMPTS

TEXTS = PLAIN_PROMPTS[:5] + [PLAIN_PROMPTS[5][:700], "a", "Embeddings map text to vectors."]
_MODES = {"LAST": "pooling_mode_lasttoken", "MEAN": "pooling_mode_mean_tokens", "CLS": "pooling_mode_cls_token"}


def add_st_config(model_dir: Path, pooling: str, normalize: bool) -> Path:
    """Makes ``model_dir`` a sentence-transformers model: Transformer -> Pooling (-> Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 2048, "do_lower_case": False}))
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    cfg = {"word_embedding_dimension": hidden, **{v: k == pooling for k, v in _MODES.items()}}
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return model_dir


def st_encode(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.tokenizer.pad_token = model.tokenizer.pad_token or model.tokenizer.eos_token
    # one text per batch: sentence-transformers pads batches on the right, which the last-token
    # pooling of a causal model handles but we need no padding to compare exactly
    return torch.stack([torch.as_tensor(model.encode([t], convert_to_tensor=True)[0]) for t in texts]).float()


def cosines(got: list[EmbeddingRequestOutput], ref: torch.Tensor) -> torch.Tensor:
    g = torch.tensor([o.outputs.embedding for o in got])
    return torch.nn.functional.cosine_similarity(g, ref, dim=-1)


def assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.llm_engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_invariants()


@pytest.fixture(scope="module")
def st_models(tmp_path_factory, default_model_path) -> dict[str, Path]:
    out = {}
    for pooling, normalize in (("MEAN", True), ("LAST", True), ("CLS", False)):
        d = make_tiny_llama(tmp_path_factory.mktemp(f"st-{pooling}"), default_model_path, seed=3)
        out[pooling] = add_st_config(d, pooling, normalize)
    return out


@pytest.mark.parametrize("pooling", ["MEAN", "LAST", "CLS"])
def test_equals_sentence_transformers(st_models, pooling):
    path = st_models[pooling]
    cfg = resolve_pooler_config(path, None)
    assert cfg.pooling_type is PoolingType(pooling) and cfg.normalize == (pooling != "CLS")
    ref = st_encode(path, TEXTS)
    # small chunks: long prompts pool across several prefill chunks (MEAN sums them, CLS keeps the first)
    llm = LLM(str(path), max_num_batched_tokens=48, num_gpu_blocks_override=64)
    got = llm.embed(TEXTS, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == [llm.get_tokenizer().encode(t) for t in TEXTS]
    cos = cosines(got, ref)
    assert (cos > 1 - 1e-5).all(), cos
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in got]), ref, atol=1e-4, rtol=1e-4)
    # batched equals unbatched
    alone = [llm.embed(t, use_tqdm=False)[0] for t in TEXTS]
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in alone]),
                               torch.tensor([o.outputs.embedding for o in got]), atol=1e-5, rtol=1e-5)
    assert_all_blocks_free(llm)
    llm.shutdown()


@pytest.fixture(scope="module")
def smol(default_model_path):
    llm = LLM(None, max_model_len=1024, num_gpu_blocks_override=128, max_num_batched_tokens=256)
    yield llm
    llm.shutdown()


def hf_last_hidden(model_path: Path, ids: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([x])).last_hidden_state[0, -1] for x in ids])


def test_smollm2_last_token_equals_transformers(smol, default_model_path):
    cfg = smol.llm_engine.config.pooler_config
    assert cfg.pooling_type is PoolingType.LAST and cfg.normalize  # a decoder model's default
    got = smol.embed(TEXTS, use_tqdm=False)
    raw = hf_last_hidden(default_model_path, [o.prompt_token_ids for o in got])
    cos = cosines(got, raw)
    assert (cos > 1 - 1e-5).all(), cos
    norms = torch.tensor([o.outputs.embedding for o in got]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(got)))
    unnormalized = smol.embed(TEXTS[:3], PoolingParams(normalize=False), use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in unnormalized]), raw[:3], atol=2e-4, rtol=1e-4)
    # the same prompt again is a prefix-cache hit (LAST pooling reads the cache) with the same vector
    again = smol.embed(TEXTS[5], use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    torch.testing.assert_close(torch.tensor(again.outputs.embedding), torch.tensor(got[5].outputs.embedding),
                               atol=1e-5, rtol=1e-5)
    assert_all_blocks_free(smol)


def test_mixed_step_keeps_generation_identical(smol, monkeypatch):
    gen_prompts = PLAIN_PROMPTS[:3]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = smol.generate(gen_prompts, params, use_tqdm=False)
    embeds_alone = smol.embed(TEXTS[:4], use_tqdm=False)
    engine = smol.llm_engine
    steps: list[tuple[list[str], set[str]]] = []  # (scheduled ids, ids pooled) per step
    execute = engine.executor.execute_model

    def recording(so):
        result = execute(so)
        steps.append((list(so.req_ids), set(result.pooler_output)))
        return result

    monkeypatch.setattr(engine.executor, "execute_model", recording)
    for i, p in enumerate(gen_prompts):
        engine.add_request(f"g{i}", p, params)
    for i, t in enumerate(TEXTS[:4]):
        engine.add_request(f"e{i}", t, PoolingParams())
    finished = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert {rid[0] for rid in steps[0][0]} == {"g", "e"}, steps[0]  # one step holds both kinds
    assert steps[0][1] == {f"e{i}" for i in range(4)}  # the four prompts fit the first step
    assert all(not pooled for _, pooled in steps[1:])
    for i, ref in enumerate(alone):
        assert finished[f"g{i}"].outputs[0].token_ids == ref.outputs[0].token_ids
    for i, ref in enumerate(embeds_alone):
        assert isinstance(finished[f"e{i}"], EmbeddingRequestOutput)
        torch.testing.assert_close(torch.tensor(finished[f"e{i}"].outputs.embedding),
                                   torch.tensor(ref.outputs.embedding), atol=1e-5, rtol=1e-5)
    assert_all_blocks_free(smol)


def test_bad_input(smol):
    with pytest.raises(ValueError, match="empty"):
        smol.embed([], use_tqdm=False)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        smol.embed([[5] * 1100], use_tqdm=False)
    with pytest.raises(InvalidInputError, match="Matryoshka") as e:
        smol.embed("hi", PoolingParams(dimensions=32), use_tqdm=False)
    assert e.value.param == "dimensions"
    with pytest.raises(InvalidInputError) as e:
        smol.embed("hi", PoolingParams(dimensions=0), use_tqdm=False)
    assert e.value.param == "dimensions"
    with pytest.raises(InvalidInputError) as e:
        smol.embed([[1, 2, 10**6]], use_tqdm=False)
    assert e.value.param == "prompt"
    assert_all_blocks_free(smol)


def test_matryoshka_dimensions_truncate_then_normalize(tmp_path, default_model_path):
    path = make_tiny_llama(tmp_path / "m", default_model_path, seed=5)
    cfg = json.loads((path / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [16, 32, 64]
    (path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(path), num_gpu_blocks_override=32)
    full = llm.embed(TEXTS[:3], PoolingParams(normalize=False), use_tqdm=False)
    cut = llm.embed(TEXTS[:3], PoolingParams(dimensions=16), use_tqdm=False)
    ref = torch.nn.functional.normalize(torch.tensor([o.outputs.embedding for o in full])[:, :16], dim=-1)
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in cut]), ref)
    with pytest.raises(InvalidInputError, match="one of") as e:
        llm.embed("x", PoolingParams(dimensions=20), use_tqdm=False)
    assert e.value.param == "dimensions"
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_runner_pooling_and_pooler_config(tmp_path, tiny_model_path):
    llm = LLM(str(tiny_model_path), runner="pooling", pooler_config={"pooling_type": "mean", "normalize": False},
              num_gpu_blocks_override=32)
    assert llm.llm_engine.config.pooler_config.pooling_type is PoolingType.MEAN
    with pytest.raises(InvalidInputError, match="runner='pooling'"):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    # MEAN never reads the prefix cache: the same prompt twice computes every position again
    a = llm.embed(TEXTS[5], use_tqdm=False)[0]
    b = llm.embed(TEXTS[5], use_tqdm=False)[0]
    assert b.num_cached_tokens == 0 and a.outputs.embedding == pytest.approx(b.outputs.embedding, abs=1e-6)
    assert_all_blocks_free(llm)
    llm.shutdown()
    # override_pooler_config replaces single fields; task="embed" is the older spelling of runner
    llm = LLM(str(tiny_model_path), task="embed", override_pooler_config={"pooling_type": "CLS"},
              num_gpu_blocks_override=32)
    cfg = llm.llm_engine.config.pooler_config
    assert llm.llm_engine.config.runner == "pooling" and cfg.pooling_type is PoolingType.CLS and cfg.normalize
    llm.shutdown()
    with pytest.raises(ValueError, match="pooling_type"):
        LLM(str(tiny_model_path), pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="runner"):
        LLM(str(tiny_model_path), runner="embed")


def test_preempted_pooling_requests_still_match(tiny_model_path):
    """A cache too small for all prompts at once: requests wait or are preempted, vectors unchanged."""
    big = LLM(str(tiny_model_path), pooler_config={"pooling_type": "MEAN"}, num_gpu_blocks_override=256)
    ref = big.embed(TEXTS, use_tqdm=False)
    big.shutdown()
    small = LLM(str(tiny_model_path), pooler_config={"pooling_type": "MEAN"}, num_gpu_blocks_override=12,
                max_num_batched_tokens=64, block_size=16)
    got = small.embed(TEXTS, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([o.outputs.embedding for o in got]),
                               torch.tensor([o.outputs.embedding for o in ref]), atol=1e-5, rtol=1e-5)
    assert_all_blocks_free(small)
    small.shutdown()


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), cuts=st.lists(st.integers(1, 39), max_size=6), restart=st.booleans(),
       kind=st.sampled_from(list(PoolingType)))
def test_pooler_chunking_property(length, cuts, restart, kind):
    """Any split of a prompt into chunks (and a restart from position 0, as after a preemption that
    dropped the KV) pools to what one whole-prompt chunk gives."""
    from engine.pooling.pooler import PoolingRow, make_pooler
    from engine.pooling.config import PoolerConfig

    torch.manual_seed(length)
    hidden = torch.randn(length, 8)
    bounds = sorted({c for c in cuts if c < length} | {0, length})
    pooler = make_pooler(PoolerConfig(pooling_type=kind))
    schedule = list(zip(bounds, bounds[1:]))
    if restart and len(schedule) > 1:
        schedule = schedule[:-1] + schedule  # ran all but the last chunk, then started over
    pooled = {}
    for a, b in schedule:
        other = torch.randn(3, 8)  # another request's rows before this one in the step
        step_hidden = torch.cat([other, hidden[a:b]])
        pooled = pooler.pool(step_hidden, [PoolingRow("r", 3, 3 + b - a, a, length)])
        assert (b == length) == ("r" in pooled)
    expected = {PoolingType.LAST: hidden[-1], PoolingType.MEAN: hidden.mean(0), PoolingType.CLS: hidden[0]}[kind]
    torch.testing.assert_close(pooled["r"], expected)
