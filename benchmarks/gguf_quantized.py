"""GGUF weights kept quantized (``quantization="gguf"``) against the fp32 path, in one run.
# (not named gguf.py: a script's folder comes first on sys.path, and that name would shadow the gguf package)

    python benchmarks/gguf_quantized.py                                   # the embedded SmolLM2 Q4_1 GGUF
    python benchmarks/gguf_quantized.py --repeats 7 --workload 0          # single-request decode only
    python benchmarks/gguf_quantized.py --llama-cpp-python /venv/bin/python   # also llama.cpp on the same file

Reports: weight bytes of each; single-request decode (32-token prompt, 128 greedy tokens,
ignore_eos; the engines interleaved, median and best of the repeats) against the bandwidth floor
of the bytes a step reads (quantized matmul weights / read bandwidth measured in the same run);
one pass of the step's GGUF matmuls alone at batch 1 (best of 20, GB/s of blocks streamed); the
64-request workload of benchmarks/throughput.py on both engines (alternating); and, given a Python
with ``llama_cpp`` installed, llama-cpp-python's single-request decode on the same file with the
same number of threads, measured between the engine's repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# this file's name shadows the gguf package when its folder leads sys.path: import the package first
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import gguf  # noqa: E402,F401

sys.path.append(str(_HERE))
from ceilings import measure_bandwidth  # noqa: E402
from throughput import engine_decode_step_s, make_workload, run_engine  # noqa: E402

LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = json.loads(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
best = []
for _ in range(int(sys.argv[5])):
    llm.reset()
    stamps = []
    for i, tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    best.append((stamps[-1] - stamps[0]) / (n - 1))
print(json.dumps(best))
"""


def matmul_weights(llm) -> list[torch.nn.Module]:
    from engine.layers.embedding import ParallelLMHead
    from engine.layers.linear import LinearBase

    model = llm.llm_engine.executor.worker.runner.model
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, (LinearBase, ParallelLMHead)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m)
    return out


def matmul_bytes(llm) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in matmul_weights(llm))


def gguf_pass_s(llm, repeats: int = 20) -> float:
    """Best time of every GGUF matmul of a step, once, at batch 1: the C kernel called with prepared
    arguments and outputs (what a decode plan replays), so no Python dispatch is counted."""
    from engine.kernels.cpu import gguf_ops
    from engine.layers.quantization.gguf import _parts

    kernels = gguf_ops.load()
    if kernels is None:
        return float("nan")
    keep, calls = [], []
    for m in matmul_weights(llm):
        if getattr(m, "gguf_k", None) is None:
            continue
        x = torch.randn(1, m.gguf_k)
        for part in _parts(m):
            y = torch.empty(1, part.blocks.shape[0])
            keep += [x, y]
            calls.append((x.data_ptr(), 1, m.gguf_k, m.gguf_k, part.blocks.data_ptr(), part.type_id,
                          part.blocks.shape[0], part.blocks.stride(0), None, y.data_ptr(), y.shape[1]))
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        for args in calls:
            kernels.lib.gq_linear(*args)
        best = min(best, time.perf_counter() - t)
    return best


def llama_cpp_step_s(python: str, gguf: Path, threads: int, prompt: list[int], n: int, repeats: int) -> float | None:
    try:
        out = subprocess.run([python, "-c", LLAMA_CPP, str(gguf), str(threads), str(n), json.dumps(prompt),
                              str(repeats)], capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"llama-cpp-python failed: {e}")
        return None
    return min(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description="quantization='gguf' vs fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workload", type=int, default=64, help="requests of the throughput workload (0 skips it)")
    p.add_argument("--llama-cpp-python", default=None, help="a Python interpreter with llama_cpp installed")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from engine.entrypoints.llm import LLM
    from engine.models.default_model import find_default_gguf

    gguf = find_default_gguf()
    engines = {"fp32": LLM(enable_prefix_caching=False), "gguf": LLM(quantization="gguf", enable_prefix_caching=False)}
    vocab = engines["fp32"].llm_engine.config.model.hf_config.vocab_size
    wl = make_workload(max(args.workload, 2), vocab, 0)
    prompt = wl.prompts[1][:32]
    for llm in engines.values():
        engine_decode_step_s(llm, prompt, 8)  # warm-up: kernel builds, plan recording
    steps: dict[str, list[float]] = {name: [] for name in [*engines, "llama.cpp"]}
    reads = []
    for _ in range(args.repeats):  # interleaved: drifting machine load hits every side alike
        reads.append(measure_bandwidth(256, 3)[0])
        for name, llm in engines.items():
            steps[name].append(engine_decode_step_s(llm, prompt, 128))
        if args.llama_cpp_python:
            s = llama_cpp_step_s(args.llama_cpp_python, gguf, torch.get_num_threads(), prompt, 128, 1)
            if s is not None:
                steps["llama.cpp"].append(s)
    read = max(reads)
    results: dict = {"read_gbps": read, "threads": torch.get_num_threads()}
    print(f"read bandwidth {read:.1f} GB/s ({torch.get_num_threads()} threads), best of {len(reads)}")
    for name, llm in engines.items():
        wb, mb = llm.llm_engine.executor.worker.weight_bytes(), matmul_bytes(llm)
        floor = mb / (read * 1e9)
        med, best = statistics.median(steps[name]), min(steps[name])
        results[name] = {"weight_bytes": wb, "matmul_bytes": mb, "step_ms_median": med * 1e3,
                         "step_ms_best": best * 1e3, "tok_s_best": 1 / best, "floor_ms": floor * 1e3,
                         "fraction_of_floor": floor / best}
        print(f"{name:5s}: weights {wb / 1e6:6.1f} MB (matmuls {mb / 1e6:6.1f} MB); single-request decode "
              f"{med * 1e3:5.2f} ms median, {best * 1e3:5.2f} ms best ({1 / best:5.1f} tok/s); bandwidth floor "
              f"{floor * 1e3:5.2f} ms = {floor / best:.0%} of the best step")
    kernel = gguf_pass_s(engines["gguf"])
    gb = matmul_bytes(engines["gguf"])
    results["gguf_matmuls_batch1_ms"] = kernel * 1e3
    print(f"gguf matmuls of one step alone (batch 1, best of 20): {kernel * 1e3:.2f} ms = {gb / kernel / 1e9:.1f} GB/s "
          f"of blocks ({gb / (read * 1e9) / kernel:.0%} of the read bandwidth)")
    if steps["llama.cpp"]:
        best = min(steps["llama.cpp"])
        results["llama.cpp"] = {"step_ms_best": best * 1e3, "tok_s_best": 1 / best}
        ratio = best / results["gguf"]["step_ms_best"] * 1e3
        print(f"llama.cpp (llama-cpp-python, same file, {torch.get_num_threads()} threads): {best * 1e3:.2f} ms best "
              f"({1 / best:.1f} tok/s); engine gguf is {ratio:.2f}x faster")
    if args.workload:
        wl = make_workload(args.workload, vocab, 0)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for name in ("gguf", "fp32"):  # gguf first: the fp32 side gets any warmer caches
            times[name].append(run_engine(engines[name], wl))
        for name, t in times.items():
            results[name]["workload_s"] = t[0]
            print(f"{name:5s}: {args.workload}-request workload {t[0]:.1f} s ({wl.num_output_tokens / t[0]:.1f} "
                  "useful tok/s)")
    for llm in engines.values():
        llm.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
