"""``python -m engine bench ...`` and the benchmarks/ scripts that wrap it, on a tiny random model:
every sub-command writes its JSON result (the documented keys, the engine's exact token counts)
and its four PNG plots at the documented size; peers that cannot run here are listed with their
reason instead of failing the run; vLLM's runner protocol is checked against a stub ``vllm``
package (the real one is too heavy for a test: its OpenMP threads take the machine for minutes)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from engine.bench.datasets import DatasetArgs, make_dataset, make_workload
from engine.bench.plots import FIG_SIZE_PX, png_size
from engine.bench.report import RESULT_KEYS
from engine.bench.vllm_peer import VLLMPeer
from engine.entrypoints.cli import main

COMMON = ["--num-gpu-blocks-override", "128", "--wait-quiet-s", "0"]
PLOTS = ("peers", "latency_cdf", "timeline", "throughput_vs_concurrency")  # every sub-command draws these
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

STUB_VLLM = '''
import time
__version__ = "0.0+stub"


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, min_tokens=0, ignore_eos=False):
        assert temperature == 0.0
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, n):
        self.token_ids = list(range(n))


class _Request:
    def __init__(self, n):
        self.outputs = [_Completion(n)]


class LLM:
    def __init__(self, model, dtype, max_model_len, seed):
        assert dtype == "float32" and max_model_len > 0

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        assert all(isinstance(p, str) or isinstance(p["prompt_token_ids"][0], int) for p in prompts)
        time.sleep(0.002 * max(p.max_tokens for p in params))  # so decode steps take time
        return [_Request(p.max_tokens) for p in params]
'''


def _run(tmp_path, model, *args: str) -> dict:
    out = tmp_path / "results"
    assert main(["bench", *args, "--model", str(model), "--result-dir", str(out), *COMMON]) == 0
    result = json.loads((out / f"{args[0]}.json").read_text())
    assert set(RESULT_KEYS) <= set(result), sorted(result)
    assert result["command"] == args[0] and result["machine"]["cpu_count"] == os.cpu_count()
    pngs = [f for f in result["files"] if f.endswith(".png")]
    assert sorted(pngs) == sorted(f"{args[0]}_{p}.png" for p in PLOTS) and f"{args[0]}.json" in result["files"]
    for name in pngs:
        assert png_size(out / name) == FIG_SIZE_PX, name
    return result


@pytest.fixture
def stub_vllm(tmp_path, monkeypatch) -> str:
    """A python whose ``import vllm`` is the stub above: VLLMPeer's own process protocol, for real."""
    (tmp_path / "stub" / "vllm").mkdir(parents=True)
    (tmp_path / "stub" / "vllm" / "__init__.py").write_text(STUB_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stub"))
    return sys.executable


def test_random_ids_is_the_throughput_workload():
    wl = make_workload(64, 49152, 0)
    assert (wl.num_prompt_tokens, wl.num_output_tokens) == (15996, 8302)  # docs/performance.md's workload
    reqs = make_dataset(DatasetArgs("random-ids", 64, None, None, seed=0, vocab_size=49152))
    assert [r.prompt_token_ids for r in reqs] == wl.prompts and [r.output_len for r in reqs] == wl.output_lens
    with pytest.raises(ValueError, match="needs --input-len"):
        make_dataset(DatasetArgs("random", 2, None, 4))


def test_throughput_with_ceilings_decode_and_peers(tmp_path, tiny_model_path, stub_vllm, capsys):
    r = _run(tmp_path, tiny_model_path, "throughput", "--num-prompts", "3", "--input-len", "12",
             "--output-len", "5", "--range-ratio", "0", "--peers", "transformers,vllm,llama.cpp",
             "--vllm-python", stub_vllm, "--baseline-requests", "2", "--ceilings", "tiny",
             "--decode-tokens", "4", "--decode-repeats", "1")
    e = r["engine"]
    assert e["output_tokens"] == 15 and e["prompt_tokens"] == 36 and e["output_tokens_per_s"] > 0
    assert 0 < e["fraction_of_fp32_compute_ceiling"] and 0 < e["fraction_of_bandwidth_floor"]
    assert 0 < e["fraction_of_fp32_fma_peak"] < 1 and r["ceilings"]["best"]["fp32_peak_gflops"] > 0
    assert e["single_request_decode_ms"] > 0 and len(r["decode_step_s"]["engine"]) == 2
    assert set(r["ceilings"]) == {"before", "after", "best"} and r["ceilings"]["best"]["fp32_gflops"] > 0
    assert {x["name"] for x in r["regions"]} >= {"ceilings before", "ceilings after", "single-request decode before"}
    peers = {p["name"]: p for p in r["peers"]}
    for name in ("transformers (sequential)", "transformers (static)", "vLLM CPU"):
        assert peers[name]["ran"] and peers[name]["output_tokens"] == 10 and peers[name]["requests"] == 2, peers[name]
        assert peers[name]["engine_is"] > 0
    assert "0.0+stub" in peers["vLLM CPU"]["settings"] and len(r["decode_step_s"]["vLLM CPU"]) == 2
    assert not peers["llama.cpp (llama-cpp-python)"]["ran"] and peers["llama.cpp (llama-cpp-python)"]["reason"]
    assert len(r["timeline"]["times"]) == len(r["timeline"]["kv_usage"]) == len(r["timeline"]["running"]) >= 1
    assert len(r["samples"]["ttft_s"]) == 3
    out = capsys.readouterr().out
    assert "engine is" in out and "of the fp32 compute ceiling" in out and "vLLM CPU single-request decode" in out
    assert "of the FMA peak" in out


def test_workload_flops_count_the_lm_head_for_sampled_tokens_only(tiny_model_path):
    """Logits are computed at a prompt's last position alone, so the compute ceiling of a workload
    charges the LM head to output tokens, the layers (and attention) to every token."""
    from engine.bench.ceilings import model_costs
    from engine.config import load_hf_config

    cfg = load_hf_config(tiny_model_path)
    m = model_costs(cfg)
    head = 2.0 * cfg.vocab_size * cfg.hidden_size
    assert m.lm_head_flops_per_token == head and 0 < head < m.flops_per_token
    layers = m.flops_per_token - head
    assert m.workload_flops(100, 0) == 100 * layers
    assert m.workload_flops(100, 10) == 110 * layers + 10 * head
    assert m.workload_flops(0, 10, context=8) == 10 * m.flops_per_token + 10 * 8 * m.attn_flops_per_ctx_token


def test_vllm_skipped_with_its_reason(tiny_model_path, monkeypatch):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    assert "--vllm-python" in VLLMPeer(None, str(tiny_model_path)).unavailable()
    assert "cannot import vllm" in VLLMPeer(sys.executable, str(tiny_model_path)).unavailable()


def test_latency(tmp_path, tiny_model_path):
    r = _run(tmp_path, tiny_model_path, "latency", "--batch-size", "2", "--input-len", "8", "--output-len", "4",
             "--num-iters", "2", "--num-iters-warmup", "0", "--peers", "none")
    assert len(r["engine"]["iteration_s"]) == 2 and r["engine"]["output_tokens"] == 8
    assert set(r["engine"]["percentiles_s"]) == {"p10", "p25", "p50", "p75", "p90", "p99"}
    assert set(r["latency_s"]) == {"engine"} and len(r["samples"]["ttft_s"]) == 2


def test_prefix_cache_on_and_off(tmp_path, tiny_model_path):
    r = _run(tmp_path, tiny_model_path, "prefix", "--num-prompts", "4", "--num-prefixes", "1", "--prefix-len", "64",
             "--input-len", "6", "--output-len", "3", "--peers", "none")
    e = r["engine"]
    assert e["prefix_cache_hit_rate"] > 0.5  # one shared 64-word prefix, four requests
    assert e["on"]["prefill_tokens_computed"] < e["off"]["prefill_tokens_computed"] == e["off"]["prompt_tokens"]
    assert e["off"]["hit_rate"] == 0 and e["on"]["steps"] > 0 and isinstance(e["greedy_outputs_equal"], bool)
    assert e["speedup_total"] > 0 and e["on"]["ttft_max_s"] >= e["on"]["ttft_p50_s"] > 0
    names = [p["name"] for p in r["peers"]]
    assert names == ["engine (prefix cache on)", "engine (prefix cache off)"]


def test_structured(tmp_path, tiny_model_path, capsys):
    r = _run(tmp_path, tiny_model_path, "structured", "--num-prompts", "2", "--input-len", "8", "--output-len", "6",
             "--range-ratio", "0", "--batch1-requests", "1", "--ttft-repeats", "1", "--compile-repeats", "1",
             "--peers", "none")
    assert [p["output_tokens"] for p in r["peers"]] == [12, 12]  # the open array keeps both at full length
    e = r["engine"]
    assert e["per_token_overhead"] is not None and e["concurrent_tokens"] == 12
    assert e["concurrent_attributed_s"] > 0 and e["batch1_tokens"] == 6 and e["batch1_attributed_s"] > 0
    assert e["ttft_cached_grammar_ms"] > 0 and e["first_compile_30_fields_ms"] > 0
    assert "| first compile, 30-field schema |" in capsys.readouterr().out


def test_serve_sweeps_concurrency(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    r = _run(tmp_path, tiny_model_path, "serve", "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
             "--range-ratio", "0", "--max-concurrency", "1,2", "--server-args=--num-gpu-blocks-override=128",
             "--peers", "all")
    sweep = r["sweep"]["engine"]
    assert [s["max_concurrency"] for s in sweep] == [1, 2]
    assert all(s["successful_requests"] == 4 and s["total_output_tokens"] == 16 for s in sweep)
    assert all(s["p99_itl_ms"] >= s["median_itl_ms"] > 0 and s["p99_ttft_ms"] > 0 for s in sweep)
    assert [(c["max_concurrency"], c["system"]) for c in r["comparison"]] == [(1, "engine"), (2, "engine")]
    skipped = {p["name"]: p["reason"] for p in r["peers"] if not p["ran"]}
    assert {"transformers", "vLLM CPU"} <= set(skipped) and all(skipped.values())


def test_bad_flags_are_clear_errors(tmp_path, tiny_model_path):
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "throughput", "--model", str(tiny_model_path), "--peers", "nope", "--result-dir",
              str(tmp_path), *COMMON])


# ---- the benchmarks/ scripts: thin wrappers with their old flags ----------------------------------

def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["throughput", "prefix_cache", "structured_output", "ceilings"])
def test_wrapper_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _script(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m engine bench" in out or "bench throughput" in out


def test_throughput_script_flags_map_to_bench():
    cmd, _ = _script("throughput").bench_argv(["--baselines", "static", "--vllm-python", "/v/python",
                                                "--num-requests", "16", "--ceilings", "quick"])
    assert cmd[:2] == ["bench", "throughput"] and cmd[-2:] == ["--ceilings", "quick"]
    assert cmd[cmd.index("--peers") + 1] == "transformers-static,vllm" and "--no-enable-prefix-caching" in cmd
    assert cmd[cmd.index("--dataset-name") + 1] == "random-ids" and cmd[cmd.index("--num-prompts") + 1] == "16"


def test_throughput_script_tiny_run(tmp_path, tiny_model_path):
    out = tmp_path / "summary.json"
    rc = _script("throughput").main(["--model", str(tiny_model_path), "--num-requests", "2", "--baselines", "none",
                                     "--result-dir", str(tmp_path / "r"), "--json", str(out), "--ceilings", "tiny",
                                     "--decode-tokens", "4", "--decode-repeats", "1", *COMMON])
    s = json.loads(out.read_text())
    assert rc == 0 and s["engine"]["useful_tok_s"] > 0 and s["ceilings"]["read_gbps"] > 0
    assert 0 < s["engine"]["fraction_of_fp32_compute_ceiling"] and s["engine"]["single_request_decode_ms"] > 0


def test_prefix_cache_script_tiny_run(tmp_path, tiny_model_path, capsys):
    rc = _script("prefix_cache").main(["--model", str(tiny_model_path), "--num-requests", "3", "--prefix-len", "40",
                                       "--max-tokens", "3", "--result-dir", str(tmp_path), *COMMON])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    # requests 2 and 3 find the 40-word prefix's two full blocks (32 of about 54 prompt tokens) cached
    assert rc == 0 and summary["on"]["hit_rate"] > 0.3 and summary["off"]["hit_rate"] == 0
    assert summary["on"]["prefill_tokens_computed"] < summary["off"]["prefill_tokens_computed"]
    assert set(summary) == {"config", "off", "on", "speedup_total", "speedup_ttft_mean", "greedy_outputs_equal"}


def test_structured_output_script_tiny_run(tmp_path, tiny_model_path):
    out = tmp_path / "figures.json"
    rc = _script("structured_output").main([
        "--model", str(tiny_model_path), "--requests", "2", "--batch1-requests", "1", "--json", str(out),
        "--result-dir", str(tmp_path), "--input-len", "8", "--output-len", "4", "--ttft-repeats", "1",
        "--compile-repeats", "1", *COMMON])
    figures = json.loads(out.read_text())
    assert rc == 0 and figures["concurrent_tokens"] > 0 and "ttft_delta_ms" in figures
    assert "first_compile_30_fields_ms" in figures and "batch1_overhead_pct" in figures


def test_ceilings_script(tiny_model_path, capsys):
    _script("ceilings").main(["--model", str(tiny_model_path), "--size", "tiny", "--wait-quiet-s", "0"])
    out = capsys.readouterr().out
    assert "GB/s" in out and "GFLOP/s" in out and "decode step floor" in out
