"""``python -m engine bench ...`` on a tiny random model: every sub-command writes its JSON result
(the documented keys, the engine's exact token counts) and PNG plots of the documented size, and
peers that cannot run here are listed with their reason instead of failing the run."""
from __future__ import annotations

import json
import os

import pytest

from engine.bench.plots import FIG_SIZE_PX, png_size
from engine.bench.report import RESULT_KEYS
from engine.entrypoints.cli import main

COMMON = ["--num-gpu-blocks-override", "128", "--wait-quiet-s", "0"]


def _run(tmp_path, model, *args: str) -> dict:
    out = tmp_path / "results"
    assert main(["bench", *args, "--model", str(model), "--result-dir", str(out), *COMMON]) == 0
    result = json.loads((out / f"{args[0]}.json").read_text())
    assert set(RESULT_KEYS) <= set(result), sorted(result)
    assert result["command"] == args[0] and result["machine"]["cpu_count"] == os.cpu_count()
    pngs = [f for f in result["files"] if f.endswith(".png")]
    assert pngs and f"{args[0]}.json" in result["files"]
    for name in pngs:
        assert png_size(out / name) == FIG_SIZE_PX, name
    return result


def test_throughput_with_peers(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    r = _run(tmp_path, tiny_model_path, "throughput", "--num-prompts", "3", "--input-len", "12", "--output-len", "5",
             "--range-ratio", "0", "--peers", "transformers,vllm")
    peers = {p["name"]: p for p in r["peers"]}
    assert r["engine"]["output_tokens"] == 15 and r["engine"]["output_tokens_per_s"] > 0
    for name in ("transformers (sequential)", "transformers (static)"):
        assert peers[name]["ran"] and peers[name]["output_tokens"] == 15, peers[name]
    assert not peers["vLLM CPU"]["ran"] and "--vllm-python" in peers["vLLM CPU"]["reason"]
    assert len(r["timeline"]["times"]) == len(r["timeline"]["kv_usage"]) >= 1
    assert len(r["samples"]["ttft_s"]) == 3


def test_latency(tmp_path, tiny_model_path):
    r = _run(tmp_path, tiny_model_path, "latency", "--batch-size", "2", "--input-len", "8", "--output-len", "4",
             "--num-iters", "2", "--num-iters-warmup", "0", "--peers", "none")
    assert len(r["engine"]["iteration_s"]) == 2 and r["engine"]["output_tokens"] == 8
    assert set(r["engine"]["percentiles_s"]) == {"p10", "p25", "p50", "p75", "p90", "p99"}


def test_prefix_cache_on_and_off(tmp_path, tiny_model_path):
    r = _run(tmp_path, tiny_model_path, "prefix", "--num-prompts", "4", "--num-prefixes", "1", "--prefix-len", "64",
             "--input-len", "6", "--output-len", "3", "--peers", "none")
    assert r["engine"]["prefix_cache_hit_rate"] > 0.5  # one shared 64-word prefix, four requests
    names = [p["name"] for p in r["peers"]]
    assert names == ["engine (prefix cache on)", "engine (prefix cache off)"]


def test_structured(tmp_path, tiny_model_path):
    r = _run(tmp_path, tiny_model_path, "structured", "--num-prompts", "2", "--input-len", "8", "--output-len", "6",
             "--range-ratio", "0", "--peers", "none")
    assert [p["output_tokens"] for p in r["peers"]] == [12, 12]  # the open array keeps both at full length
    assert r["engine"]["per_token_overhead"] is not None


def test_serve_sweeps_concurrency(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    r = _run(tmp_path, tiny_model_path, "serve", "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
             "--range-ratio", "0", "--max-concurrency", "1,2", "--server-args=--num-gpu-blocks-override=128",
             "--peers", "all")
    sweep = r["sweep"]["engine"]
    assert [s["max_concurrency"] for s in sweep] == [1, 2]
    assert all(s["successful_requests"] == 4 and s["total_output_tokens"] == 16 for s in sweep)
    skipped = {p["name"]: p["reason"] for p in r["peers"] if not p["ran"]}
    assert {"transformers", "vLLM CPU"} <= set(skipped) and all(skipped.values())


def test_bad_flags_are_clear_errors(tmp_path, tiny_model_path):
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "throughput", "--model", str(tiny_model_path), "--peers", "nope", "--result-dir",
              str(tmp_path), *COMMON])
