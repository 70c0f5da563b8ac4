"""The offline API on tiny random models: loading, validation errors, seeds, output shapes."""
from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.errors import ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from tests.conftest import assert_greedy_match, hf_greedy, make_tiny_llama


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    return LLM(str(tiny_model_path), num_gpu_blocks_override=64, max_model_len=512)


def test_tiny_model_matches_transformers(llm, tiny_model_path):
    prompts = [[1, 5, 9, 200, 3000], list(range(100, 180)), [42] * 3]
    ref = hf_greedy(tiny_model_path, prompts, 12)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert_greedy_match(o.outputs[0].token_ids, r, label=f"tiny prompt {i}")


def test_untied_and_rope_scaled_models_load_and_match(tmp_path, default_model_path):
    path = make_tiny_llama(
        tmp_path / "scaled",
        default_model_path,
        num_heads=4,
        num_kv_heads=4,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    prompts = [list(range(300, 400))]
    ref = hf_greedy(path, prompts, 8)
    llm = LLM(str(path), num_gpu_blocks_override=32)
    out = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert_greedy_match(out[0].outputs[0].token_ids, ref[0], label="llama3 rope scaling, tied")


def test_outputs_in_input_order_with_metrics(llm):
    prompts = ["a b c", "the quick brown fox jumps over the lazy dog " * 5, "x"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (7, 3, 5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [7, 3, 5]
    for o in outs:
        assert o.finished and o.outputs[0].finish_reason == "length"
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_seeded_sampling_same_alone_and_in_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3 + [SamplingParams(temperature=0, max_tokens=4)]
    batch = llm.generate(
        ["Hello there", "Once upon a time", "Numbers: 1 2 3", "Zebra"],
        [others[0], seeded, others[1], others[3]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone
    # a different seed gives a different continuation (16 tokens over a 49k vocabulary)
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate("Once upon a time", other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate({"prompt_token_ids": [7, 8, 9]}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    toks = greedy[0].outputs[0].token_ids
    stop_at = toks[3]
    out = llm.generate({"prompt_token_ids": [7, 8, 9]}, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    first = toks.index(stop_at)
    assert out.token_ids == toks[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
    ],
)
def test_invalid_sampling_params_raise_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_and_engine_keeps_serving(llm):
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate({"prompt_token_ids": [1, 10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)
    # a failure part-way through a batch submits nothing
    with pytest.raises(PromptTooLongError):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5] * 600}], use_tqdm=False)
    assert llm.get_stats()["num_waiting"] == 0
    out = llm.generate("still serving", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_prompt_larger_than_whole_cache_is_rejected(tiny_model_path):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=4, block_size=16)
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        llm.generate({"prompt_token_ids": list(range(1, 70))}, use_tqdm=False)


def test_missing_model_and_unsupported_architecture(tmp_path, tiny_model_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    bad = tmp_path / "bad-arch"
    shutil.copytree(tiny_model_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(bad))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_path, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        LLM(str(no_weights))


def test_unknown_llm_argument():
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(max_num_seq=3)


def test_generate_cli_logs_where_start_up_time_went(tiny_model_path, caplog, capsys):
    """``python -m engine generate --log-level debug`` ends with the start-up breakdown: every phase
    from the interpreter to the generated tokens, each with its seconds, summing to the total."""
    import logging
    import re

    from engine.core.startup import STARTUP
    from engine.entrypoints.cli import main

    STARTUP.marks.clear()  # one timer per process; this test process has made engines before
    with caplog.at_level(logging.DEBUG, logger="engine.startup"):
        assert main(["generate", "--model", str(tiny_model_path), "--max-tokens", "3", "--log-level", "debug",
                     "Hello"]) == 0
    reports = [r.getMessage() for r in caplog.records if r.name == "engine.startup"]
    assert len(reports) == 1, reports
    phases = dict(part.rsplit(": ", 1) for part in reports[0].split(" = ", 1)[1].split(", "))
    phases = {k: v.removesuffix(" s") for k, v in phases.items()}
    for name in ("imports", "config", "tokenizer", "workers and weights", "KV cache", "generation (3 tokens)"):
        assert name in phases, (name, reports[0])
    total = float(re.search(r"start-up to here (\d+\.\d+) s", reports[0]).group(1))
    assert abs(sum(map(float, phases.values())) - total) < 0.05
    assert "--- prompt: 'Hello'" in capsys.readouterr().out
